"""The pooled ComBat estimator with the scikit-learn contract; the federated protocol reproduces its state.

>>> combat = ComBat(batch="scanner", continuous=("age",)).fit(features, covariates)   # doctest: +SKIP
>>> harmonised = combat.transform(new_cases, new_covariates)                           # doctest: +SKIP
>>> combat.add_batches(new_site_features, new_site_covariates)                         # doctest: +SKIP

``features``: patients x features (DataFrame, or ndarray with ``feature_names``); ``covariates``: a
DataFrame with the same rows holding the batch column and the covariates. The learned state is
``model_`` (a :class:`common.combat_model.CombatModel`, storable with ``model_.save``) and the arrays
named after neuroCombat's estimates (``beta_``, ``grand_mean_``, ``var_pooled_``, ``gamma_star_``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from common.combat_design import (
    batch_index,
    covariate_effect,
    design_matrix,
    grand_mean,
    pooled_variance,
    solve_design,
    standardise,
)
from common.combat_eb import estimate_batches
from common.combat_model import CombatModel
from common.combat_spec import CombatDataError, CombatOptions, CombatSpec
from common.pooled_moments import GroupMoments


class ComBat:
    """ComBat harmonisation (neuroCombat's options), fitted on pooled data."""

    def __init__(self, batch: str = "batch", categorical: Sequence[str] = (), continuous: Sequence[str] = (),
                 eb: bool = True, parametric: bool = True, mean_only: bool = False,
                 ref_batch: str | None = None) -> None:
        self.batch = batch
        self.categorical = tuple(categorical)
        self.continuous = tuple(continuous)
        self.eb = eb
        self.parametric = parametric
        self.mean_only = mean_only
        self.ref_batch = ref_batch

    # scikit-learn's parameter protocol (enough for clone / repr without importing scikit-learn)
    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters (scikit-learn's contract)."""
        return {k: getattr(self, k) for k in ("batch", "categorical", "continuous", "eb", "parametric",
                                              "mean_only", "ref_batch")}

    def set_params(self, **params: object) -> ComBat:
        """Set constructor parameters (scikit-learn's contract); returns self."""
        for key, value in params.items():
            if key not in self.get_params():
                raise ValueError(f"unknown parameter {key!r} of ComBat")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"ComBat({args})"

    @property
    def options(self) -> CombatOptions:
        """The parameters as :class:`CombatOptions`."""
        return CombatOptions(batch=self.batch, categorical=self.categorical, continuous=self.continuous, eb=self.eb,
                             parametric=self.parametric, mean_only=self.mean_only, ref_batch=self.ref_batch)

    def _inputs(self, x: pd.DataFrame | np.ndarray, covariates: pd.DataFrame,
                feature_names: Sequence[str] | None) -> tuple[np.ndarray, list[str], list[str]]:
        if isinstance(x, pd.DataFrame):
            names = [str(c) for c in x.columns]
            y = x.to_numpy(dtype=np.float64)
        else:
            y = np.asarray(x, dtype=np.float64)
            names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(y.shape[1])]
        if y.ndim != 2:
            raise CombatDataError(f"features of shape {y.shape}; expected a (patients, features) table")
        if not isinstance(covariates, pd.DataFrame) or len(covariates) != y.shape[0]:
            raise CombatDataError("covariates must be a DataFrame with one row per patient (same order as features)")
        missing = [c for c in self.options.covariate_columns if c not in covariates.columns]
        if missing:
            raise CombatDataError(f"covariate column(s) {missing} are missing")
        bad = [n for n, ok in zip(names, np.isfinite(y).all(axis=0), strict=True) if not ok]
        if bad:
            raise CombatDataError(f"feature(s) {bad[:10]} hold NaN/inf values; impute or drop them")
        for col in self.options.categorical + (self.batch,):
            if covariates[col].isna().any():
                raise CombatDataError(f"covariate {col!r} has missing values")
        for col in self.continuous:
            values = pd.to_numeric(covariates[col], errors="coerce").to_numpy(dtype=np.float64)
            if not np.all(np.isfinite(values)):
                raise CombatDataError(f"continuous covariate {col!r} has missing or non-numeric values")
        return y, names, covariates[self.batch].astype(str).tolist()

    def fit(self, x: pd.DataFrame | np.ndarray, covariates: pd.DataFrame,
            feature_names: Sequence[str] | None = None) -> ComBat:
        """Fit on pooled data: ``x`` patients x features, ``covariates`` with the batch column."""
        y, names, labels = self._inputs(x, covariates, feature_names)
        options = self.options
        counts = pd.Series(labels).value_counts().to_dict()
        levels = {c: sorted(set(covariates[c].astype(str))) for c in options.categorical}
        spec = CombatSpec.build(options, names, counts, levels)
        small = [b for b, n in zip(spec.batches, spec.batch_counts, strict=True) if n < 2]
        if small:
            raise CombatDataError(f"batch(es) {small} have one patient; ComBat needs at least 2 per batch")
        index = batch_index(spec.batches, labels)
        for b in range(spec.n_batch):
            rows = y[index == b]
            flat = np.ptp(rows, axis=0) == 0
            if flat.any():
                raise CombatDataError(f"feature(s) {[n for n, f in zip(names, flat, strict=True) if f][:10]} are "
                                      f"constant within batch {spec.batches[b]!r}; drop them before harmonising")
        w = design_matrix(spec, labels, covariates)
        beta = solve_design(w.T @ w, w.T @ y, spec)
        grand = grand_mean(beta, spec)
        resid = y - w @ beta
        rss = np.zeros((spec.n_batch, y.shape[1]))
        np.add.at(rss, index, np.square(resid))
        var_pooled = pooled_variance(rss, spec)
        mod = covariate_effect(spec, beta, covariates, y.shape[0])
        s = standardise(y, mod, grand, var_pooled)
        estimates = estimate_batches(GroupMoments.of(s, index, spec.n_batch), options, spec.ref_index)
        self.model_ = CombatModel(spec=spec, beta=beta, grand_mean=grand, var_pooled=var_pooled, estimates=estimates)
        self._set_state()
        return self

    def _set_state(self) -> None:
        m = self.model_
        self.feature_names_in_ = np.array(m.spec.features, dtype=object)
        self.n_features_in_ = m.spec.n_features
        self.batches_ = m.batches
        self.beta_ = m.beta
        self.grand_mean_ = m.grand_mean
        self.var_pooled_ = m.var_pooled
        for key, value in m.estimates.as_dict().items():
            setattr(self, f"{key}_", value)

    def _check_fitted(self) -> CombatModel:
        if not hasattr(self, "model_"):
            raise CombatDataError("this ComBat is not fitted yet; call fit first")
        return self.model_

    def transform(self, x: pd.DataFrame | np.ndarray, covariates: pd.DataFrame) -> pd.DataFrame | np.ndarray:
        """Harmonise patients of batches the model knows (new cases of a known site, or the training cases)."""
        model = self._check_fitted()
        if self.batch not in covariates.columns:
            raise CombatDataError(f"covariates lack the batch column {self.batch!r}")
        out = model.transform(x, covariates[self.batch].astype(str).tolist(), covariates)
        if isinstance(x, pd.DataFrame):
            return pd.DataFrame(out, index=x.index, columns=list(model.spec.features))
        return out

    def fit_transform(self, x: pd.DataFrame | np.ndarray, covariates: pd.DataFrame,
                      feature_names: Sequence[str] | None = None) -> pd.DataFrame | np.ndarray:
        """Fit, then harmonise the same patients (neuroCombat's output)."""
        return self.fit(x, covariates, feature_names).transform(x, covariates)

    def add_batches(self, x: pd.DataFrame | np.ndarray, covariates: pd.DataFrame) -> ComBat:
        """Estimate batches not seen by ``fit`` (a site joining later) with the fitted model; returns self."""
        model = self._check_fitted()
        self.model_ = model.with_new_batches(x, covariates[self.batch].astype(str).tolist(), covariates)
        self._set_state()
        return self

    @classmethod
    def from_model(cls, model: CombatModel) -> ComBat:
        """An estimator around a stored (e.g. federated) model."""
        opts = model.spec.options
        est = cls(batch=opts.batch or "batch", categorical=opts.categorical, continuous=opts.continuous, eb=opts.eb,
                  parametric=opts.parametric, mean_only=opts.mean_only, ref_batch=opts.ref_batch)
        est.model_ = model
        est._set_state()
        return est
