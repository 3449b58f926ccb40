"""The segmentation study protocol: the seed's inter-observer and automatic variability tables, federated.

One round, ``segmentation_study``: the server sends the final segmentation model and its plan; every site
compares, on its own grid and over its own cases (:mod:`client.steps.segmentation_study`),

* **inter-observer**: each case with further raters' masks (``raters/<pid>/``), every pair of raters (rater 1:
  ``masks/``), the case's value the mean over its pairs;
* **automatic**: the model's mask of each held-out case with further raters (cases it was not trained on) against
  every rater, the case's value the mean over its raters,

and answers per table and metric (DSC, voxel AUC, FPR = FP/(TP+FN), FNR = FN/(TP+FN), HD95) the summary of
:func:`common.segmentation.metrics.describe` over its cases (n, sums, quartiles as means of ``cell_floor``
cases): a case is the unit (never a pair or a rater), a table over fewer than ``min_cohort`` cases is withheld,
and no reply holds one case's value. Plus the model's seconds summed over the cases it segmented, for the
"time leverage" (manual seconds per case / model seconds per case).

The server merges the sites' summaries with :func:`common.segmentation.metrics.pool_summaries`: n, mean and SD
exactly as over the pooled cases; median and IQR as the case-weighted mean of the sites' (quantiles do not
decompose; with one site and ``cell_floor`` 1 they are numpy's percentiles of the cases).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import ProtocolError
from common.protocol import Payload, Query, pack_weights
from common.segmentation.metrics import METRICS, STATS, pool_summaries
from common.segmentation.protocol import PLAN_KEY

log = logging.getLogger(__name__)

SEGMENTATION_STUDY = "segmentation_study"
TABLES: tuple[str, ...] = ("inter", "auto")
TABLE_TITLES = {"inter": "Inter-observer manual segmentation variability (rater vs rater)",
                "auto": "Automatic segmentation variability (model vs rater)"}
SECONDS_KEY, TIMED_KEY = "model_seconds_sum", "model_cases"


def study_request(weights: Mapping[str, np.ndarray], plan: Mapping[str, Any]) -> Payload:
    """The one round's request: the model's weights and its plan (as JSON)."""
    return {**pack_weights(weights), PLAN_KEY: json.dumps(plan)}


def table_reply(table: str, flat: Mapping[str, float] | None) -> Payload:
    """One table of a site's reply: ``<table>/<metric>-<stat>`` (``<table>/withheld`` 1 when it has too few
    cases)."""
    if flat is None:
        return {f"{table}/withheld": 1.0}
    return {f"{table}/{k}": float(v) for k, v in flat.items()}


def _site_table(site: str, reply: Mapping[str, Any], table: str) -> dict[str, float] | None:
    if float(reply.get(f"{table}/withheld", 0.0)) == 1.0:  # type: ignore[arg-type]
        return None
    flat = {}
    for metric in METRICS:
        for stat in STATS:
            key = f"{table}/{metric}-{stat}"
            if key not in reply:
                raise ProtocolError(site, f"the segmentation-study reply lacks {key}",
                                    "run the same fedbiopsy version at every site")
            value = float(reply[key])  # type: ignore[arg-type]
            if not np.isfinite(value):
                raise ProtocolError(site, f"{key} is not finite")
            flat[f"{metric}-{stat}"] = value
    return flat


@dataclass(frozen=True)
class StudyTables:
    """The merged tables (metric -> summary), the sites in each, and the model's time per case."""

    tables: dict[str, dict[str, dict[str, float]] | None]
    sites: dict[str, list[str]]
    model_seconds_per_case: float | None
    timed_cases: int

    def leverage(self, manual_seconds_per_case: float) -> float | None:
        """Manual seconds per case over the model's (None when no case was timed)."""
        if not self.model_seconds_per_case:
            return None
        return manual_seconds_per_case / self.model_seconds_per_case


def merge_study(replies: Mapping[str, Mapping[str, Any]]) -> StudyTables:
    """The pooled tables from the sites' replies (see the module docstring)."""
    tables: dict[str, dict[str, dict[str, float]] | None] = {}
    sites: dict[str, list[str]] = {}
    for table in TABLES:
        parts = {s: t for s, r in sorted(replies.items()) if (t := _site_table(s, r, table)) is not None}
        sites[table] = sorted(parts)
        tables[table] = pool_summaries(parts) if parts else None
    seconds = sum(float(r.get(SECONDS_KEY, 0.0)) for r in replies.values())  # type: ignore[arg-type]
    timed = int(sum(float(r.get(TIMED_KEY, 0.0)) for r in replies.values()))  # type: ignore[arg-type]
    return StudyTables(tables, sites, seconds / timed if timed else None, timed)


def run_segmentation_study(query: Query, weights: Mapping[str, np.ndarray], plan: Mapping[str, Any]) -> StudyTables:
    """Ask every site for its tables of ``weights`` against its raters; the merged tables."""
    result = merge_study(query(SEGMENTATION_STUDY, study_request(weights, plan)))
    for table in TABLES:
        merged = result.tables[table]
        if merged is not None:
            log.info("segmentation study, %s: DSC median %.3f over %d case(s) at %d site(s)", table,
                     merged["dsc"]["median"], int(merged["dsc"]["n"]), len(result.sites[table]))
    return result


def seed_rows(summary: Mapping[str, Mapping[str, float]]) -> list[dict[str, float | str]]:
    """The seed's layout: rows Median, IQR, Mean, SD; columns DSC, AUC ROC, 1-FPR, 1-FNR."""
    def column(metric: str, flip: bool) -> dict[str, float]:
        s = summary[metric]
        if not flip:
            return {"Median": s["median"], "IQR": s["q75"] - s["q25"], "Mean": s["mean"], "SD": s["sd"]}
        return {"Median": 1.0 - s["median"], "IQR": s["q75"] - s["q25"], "Mean": 1.0 - s["mean"], "SD": s["sd"]}

    cols = {"DSC": column("dsc", False), "AUC ROC": column("auc", False), "1-FPR": column("fpr", True),
            "1-FNR": column("fnr", True)}
    return [{"statistic": stat, **{name: values[stat] for name, values in cols.items()}}
            for stat in ("Median", "IQR", "Mean", "SD")]
