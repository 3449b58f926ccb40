"""The feature reduction fitted on pooled statistics; the same code serves pooled and federated data.

1. a low-variance filter: keep features whose population variance exceeds ``variance_threshold``
   (scikit-learn's ``VarianceThreshold``);
2. Pearson pruning: pairs with |r| > ``correlation_threshold`` are visited from the most correlated down
   (ties by column order); while both are still kept, the one with the larger mean |r| to the other kept
   features is dropped (on a tie, within 1e-12, the later column);
3. factor analysis on the pooled correlation matrix, scikit-learn's ``FactorAnalysis`` (SVD method) run
   on the correlation matrix instead of the standardised data, then its varimax rotation. Factors are
   ordered by explained variance, each signed so that its largest loading is positive.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from common.reduction_signature import PooledStats, ReductionError, ReductionSettings, Signature

log = logging.getLogger(__name__)

TIE_TOL = 1e-12
SMALL = 1e-12  # scikit-learn's FactorAnalysis floor on noise variances


def variance_filter(variance: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of the features whose variance exceeds ``threshold``."""
    return variance > threshold


def prune_correlated(corr: np.ndarray, threshold: float) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """Greedy Pearson pruning (see the module doc); returns the keep mask and (dropped, partner, r) triples."""
    p = corr.shape[0]
    a = np.abs(corr)
    np.fill_diagonal(a, 0.0)
    i_idx, j_idx = np.triu_indices(p, k=1)
    hot = a[i_idx, j_idx] > threshold
    i_idx, j_idx = i_idx[hot], j_idx[hot]
    order = np.lexsort((j_idx, i_idx, -a[i_idx, j_idx]))
    keep = np.ones(p, dtype=bool)
    sums = a.sum(axis=1)
    dropped: list[tuple[int, int, float]] = []
    for k in order:
        i, j = int(i_idx[k]), int(j_idx[k])
        if not (keep[i] and keep[j]):
            continue
        n_other = keep.sum() - 1
        mac_i, mac_j = sums[i] / n_other, sums[j] / n_other
        drop, partner = (i, j) if mac_i > mac_j + TIE_TOL else (j, i)
        keep[drop] = False
        sums -= a[:, drop]
        dropped.append((drop, partner, float(corr[i, j])))
    return keep, dropped


def varimax(loadings: np.ndarray, tol: float = 1e-6, max_iter: int = 100) -> np.ndarray:
    """Varimax rotation of ``loadings`` (features x factors), as scikit-learn's ``_ortho_rotation``."""
    nrow, ncol = loadings.shape
    rotation = np.eye(ncol)
    var = 0.0
    for _ in range(max_iter):
        comp_rot = loadings @ rotation
        tmp = comp_rot * ((comp_rot**2).sum(axis=0) / nrow)
        u, s, v = np.linalg.svd(loadings.T @ (comp_rot**3 - tmp))
        rotation = u @ v
        var_new = float(np.sum(s))
        if var != 0 and var_new < var * (1 + tol):
            break
        var = var_new
    return loadings @ rotation


def factor_analysis(corr: np.ndarray, n_factors: int, n_samples: int, tol: float = 1e-2,
                    max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's FactorAnalysis (SVD method) on standardised data, from their correlation matrix.

    The SVD of the scaled data ``Z / (sqrt(psi) sqrt(n))`` is the eigendecomposition of
    ``R / (sqrt(psi) sqrt(psi)')``, so the iterations are the same. Returns (unrotated loadings
    features x factors, noise variances, iterations).
    """
    from scipy.linalg import eigh

    p = corr.shape[0]
    if not 1 <= n_factors <= p:
        raise ReductionError(f"n_factors={n_factors} but {p} feature(s) are kept; lower n_factors or the pruning")
    var = np.diag(corr).copy()
    psi = np.ones(p)
    llconst = p * math.log(2.0 * math.pi) + n_factors
    old_ll = -np.inf
    w = np.zeros((n_factors, p))
    it = 0
    for it in range(max_iter):  # noqa: B007 - the count is returned
        sqrt_psi = np.sqrt(psi) + SMALL
        m = corr / np.outer(sqrt_psi, sqrt_psi)
        evals, evecs = eigh(m, subset_by_index=[p - n_factors, p - 1])
        s, vt = evals[::-1], evecs[:, ::-1].T
        unexp_var = float(np.trace(m) - s.sum())
        w = np.sqrt(np.maximum(s - 1.0, 0.0))[:, None] * vt * sqrt_psi
        ll = (llconst + np.sum(np.log(s)) + unexp_var + np.sum(np.log(psi))) * (-n_samples / 2.0)
        if ll - old_ll < tol:
            break
        old_ll = ll
        psi = np.maximum(var - np.sum(w**2, axis=0), SMALL)
    else:
        log.warning("factor analysis did not converge in %d iterations", max_iter)
    return w.T, psi, it + 1


def signature_from_stats(stats: PooledStats, settings: ReductionSettings) -> Signature:
    """The reduction on pooled statistics (the same code serves pooled and federated data)."""
    names = np.array(stats.features, dtype=object)
    dropped: dict[str, str] = {}
    var_mask = variance_filter(stats.variance, settings.variance_threshold)
    for f, v in zip(names[~var_mask], stats.variance[~var_mask], strict=True):
        dropped[str(f)] = f"variance {v:.6g} <= {settings.variance_threshold:g}"
    idx = np.flatnonzero(var_mask)
    if idx.size == 0:
        raise ReductionError(f"no feature has a variance above {settings.variance_threshold:g}")
    corr = stats.correlation(idx)
    keep, pairs = prune_correlated(corr, settings.correlation_threshold)
    for drop, partner, r in pairs:
        dropped[str(names[idx[drop]])] = f"|r| = {abs(r):.6f} with {names[idx[partner]]}"
    kept_idx = idx[keep]
    loadings, psi, n_iter = factor_analysis(corr[np.ix_(keep, keep)], settings.n_factors, stats.n,
                                            settings.fa_tol, settings.fa_max_iter)
    rotated = varimax(loadings) if settings.n_factors > 1 else loadings
    order = np.argsort(-np.square(rotated).sum(axis=0), kind="stable")
    rotated = rotated[:, order]
    signs = np.sign(rotated[np.abs(rotated).argmax(axis=0), np.arange(rotated.shape[1])])
    rotated = rotated * np.where(signs == 0, 1.0, signs)
    kept = [str(f) for f in names[kept_idx]]
    corr_names = [str(f) for f in names[idx]]
    return Signature(
        settings=settings, n_cases=stats.n, features=stats.features, dropped=dropped,
        correlation=pd.DataFrame(corr, index=corr_names, columns=corr_names),
        loadings=pd.DataFrame(rotated, index=kept, columns=[f"factor_{k + 1}" for k in range(rotated.shape[1])]),
        noise_variance=pd.Series(psi, index=kept), mean=pd.Series(stats.mean[kept_idx], index=kept),
        std=pd.Series(np.sqrt(stats.variance[kept_idx]), index=kept), n_iter=n_iter,
    )

