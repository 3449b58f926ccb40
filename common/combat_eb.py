"""ComBat's batch step: per-batch location/scale estimates, priors and empirical Bayes posteriors.

Each batch needs only the count, mean and centred sum of squares of its standardised data
(:class:`common.pooled_moments.GroupMoments`), so a pooled fit and a federated one run the same code.
As neuroCombat 0.2.12, except: the non-parametric EB weights are computed in the log domain (neuroCombat
underflows to 0/0 for large batches) and the parametric EB loop stops after :data:`MAX_EB_ITER` iterations.
Its quirks that change numbers are kept (the convergence test uses signed relative changes; the reference
batch is returned unchanged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.combat_spec import CombatDataError, CombatOptions
from common.pooled_moments import GroupMoments

log = logging.getLogger(__name__)

EB_CONVERGENCE = 1e-4  # neuroCombat's it_sol(conv=0.0001)
MAX_EB_ITER = 10_000


@dataclass(frozen=True)
class BatchEstimates:
    """ComBat's per-batch location/scale estimates, priors and EB posteriors: rows = batches."""

    gamma_hat: np.ndarray  # (B, p)
    delta_hat: np.ndarray  # (B, p)
    gamma_bar: np.ndarray  # (B,)
    t2: np.ndarray  # (B,)
    a_prior: np.ndarray  # (B,) NaN with mean_only
    b_prior: np.ndarray  # (B,)
    gamma_star: np.ndarray  # (B, p)
    delta_star: np.ndarray  # (B, p)

    FIELDS = ("gamma_hat", "delta_hat", "gamma_bar", "t2", "a_prior", "b_prior", "gamma_star", "delta_star")

    @classmethod
    def empty(cls, n_batch: int, p: int) -> BatchEstimates:
        """All-zero estimates for ``n_batch`` batches of ``p`` features."""
        z2, z1 = np.zeros((n_batch, p)), np.zeros(n_batch)
        return cls(z2, z2.copy(), z1, z1.copy(), z1.copy(), z1.copy(), z2.copy(), z2.copy())

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by field name (as they travel and are stored)."""
        return {k: getattr(self, k) for k in self.FIELDS}

    def take_rows(self, rows: Sequence[int], source: BatchEstimates) -> BatchEstimates:
        """A copy whose ``rows`` come from ``source``."""
        out = {}
        for k in self.FIELDS:
            arr = getattr(self, k).copy()
            arr[list(rows)] = getattr(source, k)[list(rows)]
            out[k] = arr
        return BatchEstimates(**out)

    def append(self, other: BatchEstimates) -> BatchEstimates:
        """These batches' rows followed by ``other``'s."""
        return BatchEstimates(**{k: np.concatenate([getattr(self, k), getattr(other, k)]) for k in self.FIELDS})


def _aprior(delta_hat: np.ndarray) -> float:
    m, s2 = delta_hat.mean(), np.var(delta_hat, ddof=1)
    return float((2 * s2 + m**2) / s2)


def _bprior(delta_hat: np.ndarray) -> float:
    m, s2 = delta_hat.mean(), np.var(delta_hat, ddof=1)
    return float((m * s2 + m**3) / s2)


def _parametric(n: int, mean: np.ndarray, m2: np.ndarray, g_hat: np.ndarray, d_hat: np.ndarray, g_bar: float,
                t2: float, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """neuroCombat's ``it_sol``, with sum((s - g)^2) = m2 + n (mean - g)^2."""
    g_old, d_old = g_hat.copy(), d_hat.copy()
    change, count = 1.0, 0
    with np.errstate(divide="ignore", invalid="ignore"):
        while change > EB_CONVERGENCE:
            g_new = (t2 * n * g_hat + d_old * g_bar) / (t2 * n + d_old)
            sum2 = m2 + n * np.square(mean - g_new)
            d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
            # Python's max with this argument order, as neuroCombat: a NaN first argument ends the loop.
            change = max((np.abs(g_new - g_old) / g_old).max(), (np.abs(d_new - d_old) / d_old).max())
            g_old, d_old = g_new, d_new
            count += 1
            if count >= MAX_EB_ITER:
                log.warning("parametric EB did not converge in %d iterations (change %.3g)", count, change)
                break
    return g_new, d_new


def _non_parametric(n: int, mean: np.ndarray, m2: np.ndarray, g_hat: np.ndarray, d_hat: np.ndarray,
                    chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """neuroCombat's ``int_eprior`` (each feature's posterior from all other features), in the log domain."""
    p = g_hat.size
    g_star, d_star = np.empty(p), np.empty(p)
    log_norm = -(n / 2.0) * np.log(2.0 * math.pi * d_hat)  # (p,) over the other features k
    for start in range(0, p, chunk):
        rows = slice(start, min(start + chunk, p))
        sum2 = m2[rows, None] + n * np.square(mean[rows, None] - g_hat[None, :])  # (rows, k)
        loglh = log_norm[None, :] - sum2 / (2.0 * d_hat[None, :])
        loglh[np.arange(rows.stop - rows.start), np.arange(rows.start, rows.stop)] = -np.inf  # leave feature i out
        w = np.exp(loglh - loglh.max(axis=1, keepdims=True))
        total = w.sum(axis=1)
        g_star[rows] = (w @ g_hat) / total
        d_star[rows] = (w @ d_hat) / total
    return g_star, d_star


def estimate_batches(moments: GroupMoments, options: CombatOptions, ref_index: int | None,
                     rows: Sequence[int] | None = None) -> BatchEstimates:
    """ComBat's L/S estimates, priors and (EB) adjustments for ``rows`` (default: every batch with patients).

    Each batch needs only its own moments: priors are pooled across features, never across batches.
    """
    n_batch, p = moments.mean.shape
    out = BatchEstimates.empty(n_batch, p)
    fields: dict[str, np.ndarray] = out.as_dict()
    for i in (np.flatnonzero(moments.n) if rows is None else rows):
        n = int(moments.n[i])
        if n < 2:
            raise CombatDataError(f"batch row {i} has {n} patient(s); ComBat needs at least 2 per batch")
        g_hat = moments.mean[i].copy()
        d_hat = np.ones(p) if options.mean_only else moments.m2[i] / (n - 1)
        d_hat[d_hat == 0] = 1.0
        g_bar, t2 = float(g_hat.mean()), float(np.var(g_hat, ddof=1))
        a = b = float("nan")
        if not options.mean_only:
            a, b = _aprior(d_hat), _bprior(d_hat)
        if i == ref_index:
            g_star, d_star = np.zeros(p), np.ones(p)
        elif not options.eb:
            g_star, d_star = g_hat.copy(), d_hat.copy()
        elif options.parametric and options.mean_only:
            g_star, d_star = (t2 * g_hat + g_bar) / (t2 + 1.0), np.ones(p)
        elif options.parametric:
            g_star, d_star = _parametric(n, moments.mean[i], moments.m2[i], g_hat, d_hat, g_bar, t2, a, b)
        else:
            g_star, d_star = _non_parametric(n, moments.mean[i], moments.m2[i], g_hat, d_hat)
        for key, value in (("gamma_hat", g_hat), ("delta_hat", d_hat), ("gamma_bar", g_bar), ("t2", t2),
                           ("a_prior", a), ("b_prior", b), ("gamma_star", g_star), ("delta_star", d_star)):
            fields[key][i] = value
    return BatchEstimates(**fields)


def adjust(y: np.ndarray, s: np.ndarray, mod_mean: np.ndarray, index: np.ndarray, estimates: BatchEstimates,
           grand: np.ndarray, var_pooled: np.ndarray, ref_index: int | None) -> np.ndarray:
    """neuroCombat's ``adjust_data_final``: remove each batch's location/scale; the reference batch is unchanged."""
    adj = (s - estimates.gamma_star[index]) / np.sqrt(estimates.delta_star[index])
    out = adj * np.sqrt(var_pooled) + grand + mod_mean
    if ref_index is not None:
        ref = index == ref_index
        out[ref] = y[ref]
    return out

