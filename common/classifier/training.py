"""The server half of federated classifier training, as plain numpy: feature scaling and the FedAvg round.

* Feature scaling: the pooled mean and SD of the training features, from the sites' exact moments
  (:mod:`common.pooled_moments`); a feature constant over the pool keeps scale 1.
* A FedAvg round: every site's weights are checked (names, shapes, finite values, positive case count, update
  norm, :func:`common.segmentation.aggregation.check_update`); the accepted ones are averaged weighted by case
  counts (:func:`common.segmentation.aggregation.weighted_mean`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from common.errors import ProtocolError
from common.pooled_moments import Moments, merge_crossproducts, site_moments
from common.protocol import Payload
from common.segmentation.aggregation import check_update, weighted_mean

log = logging.getLogger(__name__)
Weights = Mapping[str, np.ndarray]


def scaling(moments: Moments) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) that standardise features by the pooled moments (population SD; 0 -> 1)."""
    sd = moments.std(ddof=0)
    return moments.mean.copy(), np.where(sd > 0, sd, 1.0)


def standardise(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(x - mean) / scale`` as float64."""
    return (np.asarray(x, dtype=np.float64) - mean) / scale


def site_crossproduct(x: np.ndarray) -> np.ndarray:
    """The site step's extra aggregate: the centred crossproduct ``(X - mean)^T (X - mean)`` (features x features)."""
    arr = np.asarray(x, dtype=np.float64)
    centred = arr - arr.mean(axis=0)
    return centred.T @ centred


def site_feature_moments(site_id: str, x: np.ndarray, names: list[str], min_cohort: int) -> Payload:
    """The ``classifier_moments`` reply: moments and centred crossproduct of the training features, their names."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise ProtocolError(site_id, f"{len(names)} feature name(s) for a {arr.shape} feature matrix")
    reply = site_moments(site_id, arr, min_cohort)
    reply["cross"] = site_crossproduct(arr)
    reply["feature_names"] = [str(n) for n in names]
    return reply


def pooled_correlation(replies: Mapping[str, Mapping[str, object]], moments: Moments) -> np.ndarray:
    """The pooled correlation matrix of the features from the sites' moments and centred crossproducts (exact)."""
    p = moments.mean.size
    parts = []
    for site in sorted(replies):
        r = replies[site]
        c = np.asarray(r["cross"], dtype=np.float64)
        if c.shape != (p, p) or not np.all(np.isfinite(c)):
            raise ProtocolError(site, f"its feature crossproduct is not a finite {p} x {p} matrix",
                                "run the same fedbiopsy version at every site")
        parts.append((int(r["n"]), np.asarray(r["mean"], dtype=np.float64), c))  # type: ignore[call-overload]
    _, _, cross = merge_crossproducts(parts)
    sd = np.sqrt(np.diag(cross))
    sd = np.where(sd > 0, sd, 1.0)
    return cross / np.outer(sd, sd)


def step_size(correlation: np.ndarray, l2: float, lr_max: float) -> float:
    """Gradient descent's step for the logistic loss on standardised features: ``min(lr_max, 1 / L)``.

    ``L = lambda_max(R) / 4 + l2`` bounds the curvature of the mean BCE plus the L2 penalty (R the pooled
    correlation), so a step of at most ``1 / L`` decreases the pooled loss at every round; a larger one can
    oscillate or diverge with many correlated features. Used as the same heuristic cap for the MLP.
    """
    lam = float(np.linalg.eigvalsh(correlation).max()) if correlation.size else 0.0
    return float(min(lr_max, 1.0 / (0.25 * lam + l2))) if lam + l2 > 0 else float(lr_max)


def fedavg_round(global_weights: Weights, updates: Mapping[str, tuple[Weights, float]], max_norm: float,
                 minimum: int = 1, bounds: Mapping[str, float] | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The new global weights from the sites' (weights, case count), and the rejected sites with the reason.

    Arrays keep the global model's dtype. ``bounds``: the cases each site reported earlier in the study; an
    update claiming more (a site weighting itself over the others), or from a site without a bound, is
    rejected. Raises when fewer than ``minimum`` updates are acceptable.
    """
    accepted, counts, rejected = [], [], {}
    for site in sorted(updates):
        weights, n = updates[site]
        if bounds is not None and site not in bounds:
            reason: str | None = "the site reported no case count earlier in the study"
        elif bounds is not None and float(n) > bounds[site]:
            reason = "num-examples exceeds the cases the site reported earlier in the study"
        else:
            reason = check_update(weights, global_weights, max_norm, n)
        if reason is not None:
            rejected[site] = reason
            log.warning("classifier update of site %s rejected: %s", site, reason)
            continue
        accepted.append(weights)
        counts.append(float(n))
    if len(accepted) < minimum:
        raise ProtocolError(",".join(sorted(rejected)) or "(none)",
                            f"{len(accepted)} acceptable classifier update(s), need {minimum}: {rejected}")
    mean = weighted_mean(accepted, counts)
    return {k: v.astype(np.asarray(global_weights[k]).dtype) for k, v in mean.items()}, rejected
