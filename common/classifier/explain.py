"""Federated explanation summaries: mean |SHAP| per feature from sites' sums, and a model-to-model comparison.

Site step (:func:`site_shap_summary`): per feature, the sum of |SHAP| and the sum of SHAP over the site's
explained cases, and their number (at least ``min_cohort``). Server step (:func:`merge_shap`): the pooled mean
|SHAP| per feature is the sum of the sums over the sum of the counts -- exactly the mean over all explained
cases, which never leave their sites. The same for the signed mean (the direction of each feature's effect).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.errors import PolicyError, ProtocolError
from common.protocol import Payload


def site_shap_summary(site_id: str, shap_values: np.ndarray, min_cohort: int) -> Payload:
    """Per-feature sums of |SHAP| and SHAP over a site's explained cases (cases x features)."""
    v = np.asarray(shap_values, dtype=np.float64)
    if v.ndim != 2:
        raise ProtocolError(site_id, f"SHAP values are {v.ndim}-D, not cases x features")
    if v.shape[0] < min_cohort:
        raise PolicyError(site_id, "min_cohort", f"{v.shape[0]} explained case(s), policy needs {min_cohort}")
    return {"shap_abs_sum": np.abs(v).sum(axis=0), "shap_sum": v.sum(axis=0), "shap_n": int(v.shape[0])}


def merge_shap(replies: Mapping[str, Mapping[str, object]], feature_names: Sequence[str]) -> dict[str, object]:
    """Pooled and per-site mean |SHAP| and mean SHAP per feature, features ranked by pooled mean |SHAP|."""
    p = len(feature_names)
    abs_tot, sum_tot, n_tot = np.zeros(p), np.zeros(p), 0
    per_site: dict[str, dict[str, float]] = {}
    for site in sorted(replies):
        r = replies[site]
        try:
            a = np.asarray(r["shap_abs_sum"], dtype=np.float64)
            s = np.asarray(r["shap_sum"], dtype=np.float64)
            n = int(r["shap_n"])  # type: ignore[call-overload]
        except KeyError as exc:
            raise ProtocolError(site, f"SHAP reply lacks {exc}", "run the same fedbiopsy version everywhere") from exc
        if a.shape != (p,) or s.shape != (p,) or n <= 0 or np.any(a < 0) or not np.all(np.isfinite(a)):
            raise ProtocolError(site, f"SHAP sums are not {p} finite non-negative values over a positive count")
        abs_tot += a
        sum_tot += s
        n_tot += n
        per_site[site] = dict(zip(feature_names, (a / n).tolist(), strict=True))
    if n_tot == 0:
        raise ProtocolError("(none)", "no site sent SHAP sums")
    mean_abs = abs_tot / n_tot
    order = np.argsort(-mean_abs, kind="stable")
    return {
        "features": [feature_names[i] for i in order],
        "mean_abs_shap": [float(mean_abs[i]) for i in order],
        "mean_shap": [float(sum_tot[i] / n_tot) for i in order],
        "n": n_tot,
        "per_site": per_site,
    }


def top_features(shap: Mapping[str, Any], k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` features of largest pooled mean |SHAP|."""
    names = list(shap["features"])
    vals = list(shap["mean_abs_shap"])
    return list(zip(names[:k], [float(v) for v in vals[:k]], strict=True))


def compare_models(models: Mapping[str, Mapping[str, Any]], k: int = 3) -> list[dict[str, Any]]:
    """One row per model: pooled AUC, accuracy, mean confidence, and its most relevant features or regions.

    ``models[name]`` holds ``pooled`` metrics (from :func:`common.classifier.metrics.metrics_of`) and either
    ``shap`` (from :func:`merge_shap`) or ``relevance`` (a mapping of named regions to a relevance share, e.g. the
    Grad-CAM mass inside the tumour).
    """
    rows = []
    for name, body in models.items():
        pooled: Mapping[str, float] = body["pooled"]
        if body.get("shap"):
            relevant = ", ".join(f"{f} ({v:.3g})" for f, v in top_features(body["shap"], k))
        elif body.get("relevance"):
            rel: Mapping[str, float] = body["relevance"]
            relevant = ", ".join(f"{r} ({float(v):.2f})" for r, v in sorted(rel.items(), key=lambda kv: -kv[1]))
        else:
            relevant = ""
        rows.append({"model": name, "auc": pooled.get("auc"), "accuracy": pooled.get("accuracy"),
                     "confidence": pooled.get("confidence"), "brier": pooled.get("brier"),
                     "most_relevant": relevant})
    return rows
