"""Fairness per FUTURE-AI (F3): every metric per site, per vendor, per field strength and per patient stratum,
with the worst-group gap, so that a model that works for one scanner only is visible.

Groups of sites (vendor, field strength) pool their sites' aggregates exactly as the overall pool does
(:func:`common.classifier.metrics.pool`); patient strata (e.g. sex) are evaluated by each site for each
level holding at least ``min_cohort`` of its held-out cases and pooled across sites level by level.

A site that does not allow exact outcomes also withholds a level whose release would leave the complement
(its unreleased levels together) with fewer than ``cell_floor`` cases: the overall aggregates minus the
released levels' would otherwise be those few cases' (:func:`released_levels`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from common.classifier.metrics import METRICS, SiteAggregates, pool, with_ci

LOWER_IS_BETTER = frozenset({"brier"})


def released_levels(levels: Sequence[str], min_cohort: int, cell_floor: int = 1
                    ) -> tuple[list[str], list[str], np.ndarray]:
    """Which levels of one stratum attribute a site evaluates: (released, suppressed, part of each case).

    A level is released with at least ``min_cohort`` (and ``cell_floor``) cases. Above ``cell_floor`` 1 the
    suppressed levels' cases (the complement) must number 0 or at least ``cell_floor``: the smallest released
    levels are withheld too until they do. ``part`` numbers each case's released level (in sorted order) and
    gives the suppressed cases one more part.
    """
    lv = np.asarray([str(v) for v in levels])
    names, sizes = np.unique(lv, return_counts=True) if lv.size else (np.array([], dtype=str), np.array([]))
    need = max(min_cohort, cell_floor)
    size = {str(n): int(c) for n, c in zip(names, sizes, strict=True)}
    released = sorted(n for n, c in size.items() if c >= need)
    if cell_floor > 1:
        while released and 0 < lv.size - sum(size[n] for n in released) < cell_floor:
            released.remove(min(released, key=lambda n: (size[n], n)))
    suppressed = sorted(set(size) - set(released))
    index = {n: i for i, n in enumerate(released)}
    part = np.asarray([index.get(str(v), len(released)) for v in lv], dtype=np.int64)
    return released, suppressed, part


def group_metrics(aggs: Mapping[str, SiteAggregates], attribute_of: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Metrics (with CIs) per level of one site attribute (``attribute_of[site]``), pooling the level's sites."""
    levels: dict[str, list[SiteAggregates]] = {}
    for site, agg in aggs.items():
        if site in attribute_of:
            levels.setdefault(str(attribute_of[site]), []).append(agg)
    return {level: with_ci(pool(items)) for level, items in sorted(levels.items())}


def worst_group_gap(by_level: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, object]]:
    """For each metric: the best and worst level and the gap between them (always >= 0).

    Levels where the metric is undefined (e.g. AUC of a one-class group) are left out; a metric defined for
    fewer than two levels has no gap.
    """
    out: dict[str, dict[str, object]] = {}
    for m in METRICS:
        vals = {lvl: float(v[m]) for lvl, v in by_level.items() if m in v and math.isfinite(float(v[m]))}
        if len(vals) < 2:
            continue
        order = sorted(vals, key=vals.__getitem__)
        best, worst = (order[0], order[-1]) if m in LOWER_IS_BETTER else (order[-1], order[0])
        out[m] = {"gap": abs(vals[best] - vals[worst]), "worst": worst, "best": best,
                  "worst_value": vals[worst], "best_value": vals[best]}
    return out


def fairness_report(aggs: Mapping[str, SiteAggregates], site_attributes: Mapping[str, Mapping[str, str]],
                    strata: Mapping[str, Mapping[str, SiteAggregates]] | None = None) -> dict[str, dict]:
    """Per-attribute metrics and worst-group gaps.

    ``site_attributes[site]`` maps an attribute (``site``, ``vendor``, ``field_strength``) to the site's level;
    ``strata[attribute][level]`` holds the pooled aggregates of a patient stratum across sites.
    """
    attrs = sorted({a for v in site_attributes.values() for a in v})
    report: dict[str, dict] = {}
    for attr in attrs:
        levels = group_metrics(aggs, {s: v[attr] for s, v in site_attributes.items() if attr in v})
        report[attr] = {"levels": levels, "worst_group_gap": worst_group_gap(levels)}
    for attr, by_level in (strata or {}).items():
        levels = {lvl: with_ci(agg) for lvl, agg in sorted(by_level.items())}
        report[attr] = {"levels": levels, "worst_group_gap": worst_group_gap(levels)}
    return report


def gap_table(report: Mapping[str, Mapping]) -> list[dict[str, object]]:
    """Flat rows (attribute, metric, worst, best, gap) for tables and model cards."""
    rows = []
    for attr, body in report.items():
        for metric, gap in body["worst_group_gap"].items():
            rows.append({"attribute": attr, "metric": metric, "worst": gap["worst"], "best": gap["best"],
                         "worst_value": float(np.round(gap["worst_value"], 6)),
                         "best_value": float(np.round(gap["best_value"], 6)), "gap": float(np.round(gap["gap"], 6))})
    return rows
