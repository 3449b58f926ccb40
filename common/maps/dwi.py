"""Diffusion maps from a multi-b DWI series: ADC (mono-exponential, weighted least squares) and IVIM (dipy).

Signals are (voxels, b-values) arrays. ADC is fitted as ``log S = log S0 - b ADC`` by weighted least squares with
weights ``S_hat**2`` from an ordinary fit (the WLS of Salvador et al. 2005 that dipy's tensor fit uses; a trace
DWI has no gradient directions, so no tensor model applies). IVIM (D, D*, f; Le Bihan 1988) is dipy's
``IvimModel`` with its two-stage "trr" fit, which needs at least :data:`~common.maps.layout.MIN_IVIM_BVALUES`
b-values; ADC and D are in mm2/s (b in s/mm2).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from common.maps.layout import MIN_IVIM_BVALUES

ADC_MAX = 5e-3  # mm2/s: free water at 37 C is about 3e-3; fits beyond this are noise and are clipped
_FLOOR = 1e-6


def fit_adc(signal: np.ndarray, bvals: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """ADC (mm2/s) and S0 of every voxel of ``signal`` (voxels, b-values), mono-exponential WLS.

    Voxels without signal (any b-value at or below zero) get ADC 0 and S0 0.
    """
    s = np.asarray(signal, dtype=np.float64)
    b = np.asarray(bvals, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != b.size:
        raise ValueError(f"signal has shape {s.shape}; expected (voxels, {b.size})")
    valid = np.all(s > 0, axis=1)
    y = np.log(np.maximum(s, _FLOOR))
    design = np.stack([np.ones_like(b), -b], axis=1)  # (m, 2): log S0, ADC
    ols = np.linalg.lstsq(design, y.T, rcond=None)[0].T  # (n, 2)
    w = np.exp(2.0 * (ols @ design.T))  # S_hat^2
    xtwx = np.einsum("mi,nm,mj->nij", design, w, design)
    xtwy = np.einsum("mi,nm,nm->ni", design, w, y)
    det = xtwx[:, 0, 0] * xtwx[:, 1, 1] - xtwx[:, 0, 1] ** 2
    ok = valid & (np.abs(det) > 1e-300)
    beta = np.zeros_like(ols)
    inv = np.stack([xtwx[ok, 1, 1], -xtwx[ok, 0, 1], -xtwx[ok, 1, 0], xtwx[ok, 0, 0]], axis=1).reshape(-1, 2, 2)
    beta[ok] = np.einsum("nij,nj->ni", inv, xtwy[ok]) / det[ok, None]
    adc = np.clip(beta[:, 1], 0.0, ADC_MAX)
    s0 = np.where(ok, np.exp(beta[:, 0]), 0.0)
    return np.where(ok, adc, 0.0), s0


def fit_ivim(signal: np.ndarray, bvals: Sequence[float]) -> dict[str, np.ndarray]:
    """IVIM D, D* (mm2/s) and f of every voxel (dipy ``IvimModel``, fit_method ``trr``)."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.ivim import IvimModel

    b = np.asarray(bvals, dtype=np.float64)
    if np.unique(b).size < MIN_IVIM_BVALUES:
        raise ValueError(f"IVIM needs at least {MIN_IVIM_BVALUES} distinct b-values; got {np.unique(b).size}")
    bvecs = np.tile([1.0, 0.0, 0.0], (b.size, 1))
    bvecs[b == 0] = 0.0
    gtab = gradient_table(b, bvecs=bvecs, b0_threshold=0)
    s = np.maximum(np.asarray(signal, dtype=np.float64), _FLOOR)
    with warnings.catch_warnings():  # dipy warns of its default bounds, and per voxel of a linear fall-back
        warnings.simplefilter("ignore")
        fit = IvimModel(gtab, fit_method="trr").fit(s)
    return {"IVIM_D": np.asarray(fit.D, dtype=np.float64), "IVIM_Dstar": np.asarray(fit.D_star, dtype=np.float64),
            "IVIM_f": np.asarray(fit.perfusion_fraction, dtype=np.float64)}


__all__ = ["ADC_MAX", "fit_adc", "fit_ivim"]
