"""The server half of federated training, as plain numpy: reply validation and the aggregation rules.

The driver (:func:`common.segmentation.protocol.run_segmentation`) calls :func:`check_update` on every reply
and hands the accepted :class:`Update` s to an :data:`Aggregate` (Flower's strategies, ``server/strategies.py``);
the rules here are the oracle that tests compare those strategies against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Weights = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Update:
    """One site's accepted training reply: its new weights and the number of cases they were trained on."""

    site: str
    weights: Mapping[str, np.ndarray]
    num_examples: float


Aggregate = Callable[[int, Sequence[Update]], dict[str, np.ndarray]]
"""``aggregate(server_round, updates) -> new global weights`` (the strategy's rule; ``updates`` is never empty)."""


def update_norm(new: Weights, reference: Weights) -> float:
    """The L2 norm of ``new - reference`` over all arrays."""
    total = 0.0
    for key, ref in reference.items():
        total += float(np.square(np.asarray(new[key], dtype=np.float64) - np.asarray(ref, dtype=np.float64)).sum())
    return float(np.sqrt(total))


def check_update(new: Weights, reference: Weights, max_norm: float, num_examples: float | None = None) -> str | None:
    """Why a site's weights must be rejected (None when they are acceptable).

    Checks: the same array names and shapes as the global model, numeric and finite values, a positive case
    count, and an update norm ``||new - reference||`` of at most ``max_norm``.
    """
    missing = sorted(set(reference) - set(new))
    extra = sorted(set(new) - set(reference))
    if missing or extra:
        return f"array names differ from the global model (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, ref in reference.items():
        arr = np.asarray(new[key])
        if arr.shape != np.shape(ref):
            return f"array {key!r} has shape {arr.shape}, the global model has {np.shape(ref)}"
        if not np.issubdtype(arr.dtype, np.number):
            return f"array {key!r} is not numeric ({arr.dtype})"
        if not np.all(np.isfinite(arr)):
            return f"array {key!r} holds NaN or infinite values"
    if num_examples is not None and not (np.isfinite(num_examples) and num_examples > 0):
        return f"num-examples is {num_examples}, not a positive count"
    norm = update_norm(new, reference)
    if norm > max_norm:
        return f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


def weighted_mean(weights: Sequence[Weights], counts: Sequence[float]) -> dict[str, np.ndarray]:
    """FedAvg: the case-weighted mean of each array."""
    share = np.asarray(counts, dtype=np.float64) / float(sum(counts))
    return {k: np.tensordot(share, np.stack([np.asarray(w[k], dtype=np.float64) for w in weights]), axes=1)
            for k in weights[0]}


def coordinate_median(weights: Sequence[Weights]) -> dict[str, np.ndarray]:
    """FedMedian: the coordinate-wise median of each array."""
    return {k: np.median(np.stack([np.asarray(w[k]) for w in weights]), axis=0) for k in weights[0]}


def trimmed_mean(weights: Sequence[Weights], beta: float) -> dict[str, np.ndarray]:
    """FedTrimmedAvg: the coordinate-wise mean after cutting a ``beta`` share of values at each end."""
    from scipy.stats import trim_mean

    return {k: np.asarray(trim_mean(np.stack([np.asarray(w[k]) for w in weights]), beta, axis=0))
            for k in weights[0]}
