"""Segmentation metrics per case and their summaries (median, IQR, mean, SD), per site and pooled.

Definitions follow the seed's tables: DSC = 2TP/(2TP+FP+FN); FPR = FP/(TP+FN) and FNR = FN/(TP+FN), both
relative to the reference tumour volume; voxel-wise AUC ROC of the predicted tumour probability; HD95 in mm
(95th percentile of the symmetric surface distances). DSC and HD95 come from ``monai.metrics``; the AUC from
scikit-learn (MONAI's ROC AUC loops over voxels in Python).

A site's summary holds only aggregates over its cases (n, sum, sum of squares, quartiles), which merge into a
pooled summary: exact for n, mean and SD, a case-weighted mean of the sites' quartiles for the median and IQR
(quantiles do not decompose; the same choice as the fingerprint protocol).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from common.errors import PolicyError, ProtocolError

METRICS: tuple[str, ...] = ("dsc", "auc", "fpr", "fnr", "hd95")
STATS: tuple[str, ...] = ("n", "sum", "sumsq", "median", "q25", "q75", "mean", "sd")


def case_metrics(truth: np.ndarray, pred: np.ndarray, prob: np.ndarray | None = None,
                 spacing: Sequence[float] | None = None) -> dict[str, float]:
    """DSC, AUC, FPR, FNR and HD95 of one predicted mask against a reference mask (same grid).

    ``prob`` is the predicted tumour probability (the AUC uses the binary mask when absent); ``spacing`` is in
    array axis order (mm). When one mask is empty the HD95 is the grid's diagonal (the worst it can be), 0 when
    both are: never undefined, so a server's model cannot choose which cases a summary of HD95 is over (an
    empty prediction everywhere but one case would otherwise make the summary that case's value).
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    t = np.asarray(truth) > 0
    p = np.asarray(pred) > 0
    if t.shape != p.shape:
        raise ValueError(f"reference mask shape {t.shape} differs from prediction shape {p.shape}")
    tp = float(np.count_nonzero(t & p))
    fp = float(np.count_nonzero(~t & p))
    fn = float(np.count_nonzero(t & ~p))
    ref = tp + fn
    tt = torch.from_numpy(t[None, None].astype(np.float32))
    pt = torch.from_numpy(p[None, None].astype(np.float32))
    if ref == 0 and tp + fp == 0:
        dsc = 1.0
    else:
        dsc = float(compute_dice(pt, tt, include_background=True, ignore_empty=False)[0, 0])
    step = np.asarray(spacing if spacing is not None else (1.0,) * t.ndim, dtype=np.float64)
    hd95 = 0.0 if not t.any() and not p.any() else float(np.sqrt(np.sum((np.asarray(t.shape) * step) ** 2)))
    if t.any() and p.any():
        with warnings.catch_warnings():  # MONAI 1.6 warns about its own deprecated argument
            warnings.simplefilter("ignore", FutureWarning)
            hd95 = float(compute_hausdorff_distance(pt, tt, include_background=True, percentile=95.0,
                                                    spacing=list(spacing) if spacing is not None else None)[0, 0])
    return {
        "dsc": dsc,
        "auc": voxel_auc(t, p if prob is None else np.asarray(prob, dtype=np.float64)),
        "fpr": fp / ref if ref else math.nan,
        "fnr": fn / ref if ref else math.nan,
        "hd95": hd95,
    }


def voxel_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """Voxel-wise area under the ROC curve of ``score`` for the reference mask (NaN for a one-class mask)."""
    from sklearn.metrics import roc_auc_score

    t = np.asarray(truth).ravel() > 0
    if t.all() or not t.any():
        return math.nan
    return float(roc_auc_score(t, np.asarray(score, dtype=np.float64).ravel()))


def local_quantile(sorted_values: np.ndarray, q: float, k: int) -> float:
    """The ``q`` quantile as the mean of the ``k`` sorted values around its position (``k`` 1: the nearest value):
    with ``k`` at a site's cell floor it is never one case's value."""
    n = sorted_values.size
    m = min(max(k, 1), n)
    start = int(np.clip(round(q * (n - 1)) - (m - 1) // 2, 0, n - m))
    return float(sorted_values[start:start + m].mean())


def describe(values: Iterable[float], cell_floor: int = 1) -> dict[str, float]:
    """n, sum, sum of squares, median, quartiles, mean and SD of the finite values (zeros when none).

    With ``cell_floor`` > 1 the quartiles are :func:`local_quantile` means of ``cell_floor`` cases, whose windows
    are disjoint and leave at least ``cell_floor`` cases outside them from ``4 x cell_floor + 2`` cases on; with fewer,
    every quartile is the mean (the sum minus a clamped window would be a few cases' values). Numpy's
    interpolated percentiles otherwise.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return dict.fromkeys(STATS, 0.0)
    if cell_floor > 1 and v.size < 4 * cell_floor + 2:  # overlapping or clamped windows: sum minus them, a few cases
        q25 = med = q75 = float(v.mean())
    elif cell_floor > 1:
        ordered = np.sort(v)
        q25, med, q75 = (local_quantile(ordered, q, cell_floor) for q in (0.25, 0.5, 0.75))
    else:
        q25, med, q75 = np.percentile(v, [25.0, 50.0, 75.0])
    return {
        "n": float(v.size), "sum": float(v.sum()), "sumsq": float(np.square(v).sum()),
        "median": float(med), "q25": float(q25), "q75": float(q75),
        "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
    }


def summarise_cases(per_case: Sequence[Mapping[str, float]], cell_floor: int = 1) -> dict[str, dict[str, float]]:
    """Each metric's :func:`describe` over cases.

    With ``cell_floor`` > 1 a metric that is undefined (NaN) for fewer than ``cell_floor`` cases, but some, is
    withheld (all zeros): its ``n`` would count those few cases, and its sums would leave them out.
    """
    out = {}
    for m in METRICS:
        values = [c[m] for c in per_case]
        undefined = sum(1 for x in values if x is None or not math.isfinite(x))
        out[m] = dict.fromkeys(STATS, 0.0) if 0 < undefined < cell_floor else describe(values, cell_floor)
    return out


def site_summary(site_id: str, per_case: Sequence[Mapping[str, float]], min_cohort: int,
                 cell_floor: int = 1) -> dict[str, float]:
    """A site's flat summary (``<metric>-<stat>`` plus ``num-examples``); refuses below ``min_cohort`` cases."""
    if len(per_case) < min_cohort:
        raise PolicyError(site_id, "min_cohort",
                          f"{len(per_case)} held-out case(s) to evaluate, policy needs at least {min_cohort}")
    flat: dict[str, float] = {"num-examples": float(len(per_case))}
    for metric, stats in summarise_cases(per_case, cell_floor).items():
        for stat, value in stats.items():
            flat[f"{metric}-{stat}"] = value
    return flat


def unflatten(flat: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"dsc-median": x, ...}`` as ``{"dsc": {"median": x, ...}, ...}`` (unknown keys ignored)."""
    out: dict[str, dict[str, float]] = {}
    for metric in METRICS:
        stats = {s: float(flat[f"{metric}-{s}"]) for s in STATS if f"{metric}-{s}" in flat}
        if stats:
            out[metric] = stats
    return out


def pool_summaries(sites: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Merge sites' flat summaries: exact n, mean and SD; case-weighted quartiles."""
    if not sites:
        raise ProtocolError("(none)", "no site summary to pool")
    pooled: dict[str, dict[str, float]] = {}
    for metric in METRICS:
        parts = []
        for site, flat in sites.items():
            keys = [f"{metric}-{s}" for s in STATS]
            if any(k not in flat for k in keys):
                raise ProtocolError(site, f"evaluation reply lacks the {metric} summary",
                                    "run the same fedbiopsy version at every site")
            parts.append({s: float(flat[f"{metric}-{s}"]) for s in STATS})
        n = sum(p["n"] for p in parts)
        if n == 0:
            pooled[metric] = dict.fromkeys(STATS, 0.0)
            continue
        s1 = sum(p["sum"] for p in parts)
        s2 = sum(p["sumsq"] for p in parts)
        mean = s1 / n
        var = max(s2 / n - mean**2, 0.0) * n / max(n - 1.0, 1.0)
        w = [p["n"] / n for p in parts]
        pooled[metric] = {
            "n": n, "sum": s1, "sumsq": s2, "mean": mean, "sd": math.sqrt(var),
            **{q: float(sum(wi * p[q] for wi, p in zip(w, parts, strict=True))) for q in ("median", "q25", "q75")},
        }
    return pooled


def headline(summary: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The registry's flat view of a summary: ``<metric>_median``, ``<metric>_iqr``, ``<metric>_mean``, ..."""
    out: dict[str, float] = {}
    for metric, s in summary.items():
        out[f"{metric}_median"] = s["median"]
        out[f"{metric}_iqr"] = s["q75"] - s["q25"]
        out[f"{metric}_mean"] = s["mean"]
        out[f"{metric}_sd"] = s["sd"]
    return out
