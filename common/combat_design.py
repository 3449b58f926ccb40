"""ComBat's design matrix and pooled fit (neuroCombat 0.2.12's ``make_design_matrix``, ``fit_LS_model``).

Design = [one-hot batch (no intercept; the reference batch's column all ones) | categorical one-hots without
their first level | continuous covariates]. The fit is a linear solve of the (pooled) crossproducts W'W, W'Y,
not an explicit inverse; the pooled variance divides by n and zero variances become 1, as neuroCombat's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from common.combat_spec import CombatDataError, CombatSpec


def batch_index(batches: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """The row of each label in ``batches``; raises on a label the model does not know."""
    lookup = {b: i for i, b in enumerate(batches)}
    unknown = sorted({str(x) for x in labels} - set(lookup))
    if unknown:
        raise CombatDataError(f"batch(es) {unknown} are not in the model (known: {list(batches)}); "
                              "fit them first (ComBat.add_batches / CombatModel.with_new_batches)")
    return np.array([lookup[str(x)] for x in labels], dtype=np.intp)


def covariate_matrix(spec: CombatSpec, covariates: pd.DataFrame | None, n: int) -> np.ndarray:
    """The covariate block of the design (n x q_cov): categorical one-hots without the first level, continuous."""
    opts = spec.options
    cols: list[np.ndarray] = []
    if opts.categorical or opts.continuous:
        if covariates is None:
            raise CombatDataError(f"covariates {list(opts.categorical + opts.continuous)} are needed but none given")
        missing = [c for c in opts.categorical + opts.continuous if c not in covariates.columns]
        if missing:
            raise CombatDataError(f"covariate column(s) {missing} are missing")
    for col, levels in zip(opts.categorical, spec.categorical_levels, strict=True):
        values = covariates[col].astype(str).to_numpy()  # type: ignore[index]
        unknown = sorted(set(values) - set(levels))
        if unknown:
            raise CombatDataError(f"covariate {col!r} has level(s) {unknown} unknown to the model "
                                  f"(levels {list(levels)})")
        cols.extend((values == lev).astype(np.float64) for lev in levels[1:])
    for col in opts.continuous:
        cols.append(np.asarray(covariates[col], dtype=np.float64))  # type: ignore[index]
    return np.column_stack(cols) if cols else np.zeros((n, 0))


def design_matrix(spec: CombatSpec, labels: Sequence[str], covariates: pd.DataFrame | None) -> np.ndarray:
    """neuroCombat's ``make_design_matrix`` for these patients (n x q), with the spec's global levels."""
    idx = batch_index(spec.batches, labels)
    onehot = np.zeros((len(idx), spec.n_batch))
    onehot[np.arange(len(idx)), idx] = 1.0
    if spec.ref_index is not None:
        onehot[:, spec.ref_index] = 1.0
    return np.hstack([onehot, covariate_matrix(spec, covariates, len(idx))])


# --------------------------------------------------------------------------------------------- fit


def solve_design(wtw: np.ndarray, wty: np.ndarray, spec: CombatSpec) -> np.ndarray:
    """beta = (W'W)^-1 W'Y; raises naming the design columns that make W'W singular."""
    d = np.sqrt(np.diag(wtw))
    if np.any(d == 0):
        empty = [c for c, v in zip(spec.design_columns, d, strict=True) if v == 0]
        raise CombatDataError(f"design column(s) {empty} are all zero (no patient has that level)")
    scaled = wtw / np.outer(d, d)
    if np.linalg.cond(scaled) > 1e10:
        culprits = [c for i, c in enumerate(spec.design_columns)
                    if np.linalg.cond(np.delete(np.delete(scaled, i, 0), i, 1)) <= 1e10]
        raise CombatDataError(
            f"the design matrix is singular: column(s) {culprits or list(spec.design_columns)} are confounded "
            "(a covariate constant or fully determined by batch); drop or merge those covariates"
        )
    return np.linalg.solve(wtw, wty)


def grand_mean(beta: np.ndarray, spec: CombatSpec) -> np.ndarray:
    """The batch-weighted mean of the batch coefficients (the reference batch's with ref_batch)."""
    if spec.ref_index is not None:
        return beta[spec.ref_index].copy()
    weights = np.asarray(spec.batch_counts, dtype=np.float64) / float(spec.n_cases)
    return weights @ beta[: spec.n_batch]


def pooled_variance(rss: np.ndarray, spec: CombatSpec) -> np.ndarray:
    """Per-feature residual variance (divisor n) from per-batch residual sums of squares (B x p)."""
    counts = np.asarray(spec.batch_counts, dtype=np.float64)
    if spec.ref_index is not None:
        var = rss[spec.ref_index] / counts[spec.ref_index]
    else:
        var = rss.sum(axis=0) / counts.sum()
    var = var.copy()
    var[var == 0] = np.median(var != 0)  # neuroCombat's quirk, kept for parity
    return var


def covariate_effect(spec: CombatSpec, beta: np.ndarray, covariates: pd.DataFrame | None, n: int) -> np.ndarray:
    """neuroCombat's ``mod_mean`` (n x p): the covariates' part of the fit."""
    return covariate_matrix(spec, covariates, n) @ beta[spec.n_batch:]


def standardise(y: np.ndarray, mod_mean: np.ndarray, grand: np.ndarray, var_pooled: np.ndarray) -> np.ndarray:
    """neuroCombat's standardised data ``s`` (n x p)."""
    return (y - grand - mod_mean) / np.sqrt(var_pooled)
