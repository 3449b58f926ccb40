"""The server step of the classifier evaluation: sites' aggregates in, every reported figure out.

Per site, pooled, per group (site, vendor, field strength) and per patient stratum: AUC, accuracy, sensitivity,
specificity, Brier score with bootstrap CIs (see :mod:`common.classifier.metrics` for what is exact and
why), reliability diagrams, worst-group gaps, the federated mean |SHAP| per feature and the Grad-CAM summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

from common.classifier.explain import merge_shap
from common.classifier.fairness import fairness_report
from common.classifier.metrics import SiteAggregates, finite, parse_site_evaluation, pool, reliability, with_ci
from common.errors import ProtocolError

STRATUM = "stratum/"


def _strata(site: str, reply: Mapping[str, object], bins: int) -> dict[tuple[str, str], SiteAggregates]:
    """The stratum aggregates of one reply, by (attribute, level)."""
    keys: dict[tuple[str, str], dict[str, object]] = {}
    for key, value in reply.items():
        if key.startswith(STRATUM):
            parts = key[len(STRATUM):].split("/")
            if len(parts) != 3:
                raise ProtocolError(site, f"malformed stratum key {key!r}")
            keys.setdefault((parts[0], parts[1]), {})[parts[2]] = value
    return {k: parse_site_evaluation(site, v, bins) for k, v in keys.items()}


def summarise_evaluation(replies: Mapping[str, Mapping[str, object]],
                         site_attributes: Mapping[str, Mapping[str, str]], *, bins: int, calibration_bins: int,
                         feature_names: Sequence[str] | None = None) -> dict:
    """Everything the classifier phase reports, from the sites' evaluation replies."""
    if not replies:
        raise ProtocolError("(none)", "no site evaluated the classifier")
    aggs = {s: parse_site_evaluation(s, replies[s], bins) for s in sorted(replies)}
    pooled = pool(aggs.values())
    strata: dict[str, dict[str, list[SiteAggregates]]] = {}
    for s in sorted(replies):
        for (attr, level), agg in _strata(s, replies[s], bins).items():
            strata.setdefault(attr, {}).setdefault(level, []).append(agg)
    attrs = {s: {"site": s, **{k: str(v) for k, v in site_attributes.get(s, {}).items()}} for s in aggs}
    fairness = fairness_report(aggs, attrs, {a: {lvl: pool(v) for lvl, v in by.items()} for a, by in strata.items()})
    out: dict = {
        "per_site": {s: with_ci(a) for s, a in aggs.items()},
        "pooled": with_ci(pooled),
        "reliability": {"pooled": reliability(pooled.summary, calibration_bins),
                        **{s: reliability(a.summary, calibration_bins) for s, a in aggs.items()}},
        "fairness": fairness,
        "suppressed": {s: list(replies[s].get("suppressed", []) or []) for s in sorted(replies)},  # type: ignore[call-overload]
    }
    if feature_names is not None and all("shap_abs_sum" in r for r in replies.values()):
        out["shap"] = merge_shap(replies, feature_names)
        out["shap"]["base_value"] = float(next(iter(replies.values())).get("shap_base", math.nan))  # type: ignore[arg-type]
    if all("gradcam_n" in r for r in replies.values()):
        def total(key: str) -> float:
            return math.fsum(float(cast(float, r[key])) for r in replies.values())

        n = int(total("gradcam_n"))
        if n:
            out["gradcam"] = {"n": n, "peak_in_tumour": total("gradcam_peak_sum") / n,
                              "mass_in_tumour": total("gradcam_mass_sum") / n,
                              "chance": total("gradcam_chance_sum") / n}
    return out


def registry_metrics(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{site or "pooled": {metric: float}}`` (finite values only), the artifact contract's ``metrics``."""
    out = {s: finite(m) for s, m in summary["per_site"].items()}
    out["pooled"] = finite(summary["pooled"])
    return out
