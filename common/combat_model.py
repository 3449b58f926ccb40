"""A fitted ComBat model (Johnson, Li & Rabinovic 2007, as coded in neuroCombat 0.2.12), storable as ``.npz``.

The model of ``y_jv = alpha_v + x_j' beta_v + gamma_bv + delta_bv * e_jv`` (patient j of batch b, feature v):
the OLS coefficients, grand mean and pooled variance, and every batch's estimates. It harmonises new cases
of known batches and estimates batches it has not seen. Built by the pooled estimator
(:mod:`common.combat_estimator`) and by the federated protocol (:mod:`common.harmonisation`) alike; the maths
are in :mod:`common.combat_design` and :mod:`common.combat_eb`, the deliberate differences from neuroCombat
in docs/COMBAT.md (data and continuous covariates stay float64, where neuroCombat casts them to float32).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from common.combat_design import batch_index, covariate_effect, standardise
from common.combat_eb import BatchEstimates, adjust, estimate_batches
from common.combat_spec import CombatDataError, CombatSpec
from common.pooled_moments import GroupMoments

MODEL_FORMAT = "fedbiopsy-combat/1"


@dataclass(frozen=True)
class CombatModel:
    """A fitted ComBat model: harmonises new cases of known batches and estimates new batches.

    ``batches`` are the rows of ``estimates``: the fitted ``spec.batches`` and any batch added later with
    :meth:`with_new_batches` (whose patients did not take part in the fit of ``beta``/``var_pooled``).
    """

    spec: CombatSpec
    beta: np.ndarray  # (q, p) OLS coefficients, rows = spec.design_columns
    grand_mean: np.ndarray  # (p,)
    var_pooled: np.ndarray  # (p,)
    estimates: BatchEstimates
    batches: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.batches:
            object.__setattr__(self, "batches", self.spec.batches)

    @property
    def ref_index(self) -> int | None:
        """The reference batch's row of ``estimates`` (None without ``ref_batch``)."""
        ref = self.spec.options.ref_batch
        return None if ref is None else self.batches.index(ref)

    def _matrix(self, y: np.ndarray | pd.DataFrame) -> np.ndarray:
        if isinstance(y, pd.DataFrame):
            missing = [f for f in self.spec.features if f not in y.columns]
            if missing:
                raise CombatDataError(f"feature column(s) {missing[:10]} are missing ({len(missing)} in all)")
            y = y[list(self.spec.features)].to_numpy(dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 2 or y.shape[1] != self.spec.n_features:
            raise CombatDataError(f"data of shape {y.shape}; expected (patients, {self.spec.n_features} features)")
        if not np.all(np.isfinite(y)):
            raise CombatDataError(f"{int(np.sum(~np.isfinite(y)))} NaN/inf value(s) in the data; impute or drop them")
        return y

    def standardised(self, y: np.ndarray | pd.DataFrame, covariates: pd.DataFrame | None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data, standardised data, covariate effect) of new patients under this model."""
        y = self._matrix(y)
        mod = covariate_effect(self.spec, self.beta, covariates, y.shape[0])
        return y, standardise(y, mod, self.grand_mean, self.var_pooled), mod

    def transform(self, y: np.ndarray | pd.DataFrame, labels: Sequence[str],
                  covariates: pd.DataFrame | None = None) -> np.ndarray:
        """Harmonise patients (rows) of known batches; equals the fit's own output for its patients."""
        yy, s, mod = self.standardised(y, covariates)
        index = batch_index(self.batches, labels)
        return adjust(yy, s, mod, index, self.estimates, self.grand_mean, self.var_pooled, self.ref_index)

    def with_new_batches(self, y: np.ndarray | pd.DataFrame, labels: Sequence[str],
                         covariates: pd.DataFrame | None = None) -> CombatModel:
        """This model plus the location/scale (and EB) estimates of batches it has not seen.

        The fitted ``beta``, grand mean and pooled variance stay as they are; each new batch is
        standardised with them and gets its own estimates and priors, as a fitted batch would.
        """
        labels = [str(x) for x in labels]
        new = sorted(set(labels))
        known = sorted(set(new) & set(self.batches))
        if known:
            raise CombatDataError(f"batch(es) {known} are already in the model; use transform for their patients")
        _, s, _ = self.standardised(y, covariates)
        index = np.array([new.index(lab) for lab in labels], dtype=np.intp)
        small = [b for b, c in zip(new, np.bincount(index, minlength=len(new)), strict=True) if c < 2]
        if small:
            raise CombatDataError(f"new batch(es) {small} have fewer than 2 patients; ComBat needs at least 2")
        est = estimate_batches(GroupMoments.of(s, index, len(new)), self.spec.options, None)
        return replace(self, estimates=self.estimates.append(est), batches=self.batches + tuple(new))

    # ------------------------------------------------------------------------------------ storage

    def save(self, path: Path | str) -> Path:
        """Write the model as one ``.npz`` (arrays + the spec as JSON; no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"format": MODEL_FORMAT, "spec": json.loads(self.spec.to_json()),
                           "batches": list(self.batches)}, sort_keys=True)
        arrays = {"meta": np.array(meta), "beta": self.beta, "grand_mean": self.grand_mean,
                  "var_pooled": self.var_pooled, **self.estimates.as_dict()}
        with path.open("wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: Path | str) -> CombatModel:
        """Read a model written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != MODEL_FORMAT:
                raise CombatDataError(f"{path}: not a {MODEL_FORMAT} model (format {meta.get('format')!r})")
            est = BatchEstimates(**{k: data[k] for k in BatchEstimates.FIELDS})
            return cls(spec=CombatSpec.from_json(json.dumps(meta["spec"])), beta=data["beta"],
                       grand_mean=data["grand_mean"], var_pooled=data["var_pooled"], estimates=est,
                       batches=tuple(meta["batches"]))
