"""Tumour habitats from two parametric maps: the tumour's voxels split by fixed thresholds into four habitats.

With ADC x Ktrans (the default) the habitats are the classic ones: low ADC (dense cells) or high ADC (oedema,
necrosis), each poorly or well perfused. The thresholds are the study's, the same numbers at every site, so that
a habitat means the same tissue everywhere and no federated step is needed; each case's features are the volume
fractions of its tumour in each habitat (they sum to 1).
"""

from __future__ import annotations

import numpy as np

PREFIX = "habitat"


def habitat_names(first: str, second: str) -> tuple[str, ...]:
    """The feature names of the four habitats of maps ``first`` x ``second``, in a fixed order."""
    return tuple(f"{PREFIX}_{first}{a}_{second}{b}_fraction" for a in ("low", "high") for b in ("low", "high"))


def habitat_fractions(first: np.ndarray, second: np.ndarray, mask: np.ndarray, thresholds: tuple[float, float],
                      names: tuple[str, str]) -> dict[str, float]:
    """The fraction of the tumour ``mask`` in each habitat of ``first`` x ``second`` (same grid)."""
    inside = np.asarray(mask) > 0
    if first.shape != inside.shape or second.shape != inside.shape:
        raise ValueError(f"maps {first.shape}, {second.shape} and mask {inside.shape} are not on one grid")
    n = int(inside.sum())
    if n == 0:
        raise ValueError("the tumour mask is empty")
    hi_a = first[inside] > thresholds[0]
    hi_b = second[inside] > thresholds[1]
    keys = habitat_names(*names)
    counts = [(~hi_a & ~hi_b).sum(), (~hi_a & hi_b).sum(), (hi_a & ~hi_b).sum(), (hi_a & hi_b).sum()]
    return {k: float(c) / n for k, c in zip(keys, counts, strict=True)}


__all__ = ["PREFIX", "habitat_fractions", "habitat_names"]
