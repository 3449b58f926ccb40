"""ComBat's model and maths (Johnson, Li & Rabinovic 2007, as coded in neuroCombat 0.2.12).

Shared by the pooled estimator (:mod:`common.combat_estimator`) and the federated protocol
(:mod:`common.combat`). The batch step works on per-batch *moments* (count, mean and centred sum of
squares of each feature) instead of patient rows, so a pooled fit and a federated one run the same code.

Model: ``y_jv = alpha_v + x_j' beta_v + gamma_bv + delta_bv * e_jv`` for patient j of batch b and feature v;
design = [one-hot batch (no intercept; the reference batch's column all ones) | categorical one-hots without
their first level | continuous covariates].

Deliberate differences from neuroCombat (see docs/COMBAT.md): data and continuous covariates stay float64
(neuroCombat casts them to float32); the OLS fit is a linear solve, not an explicit inverse; the
non-parametric EB weights are computed in the log domain (neuroCombat underflows to 0/0 for large batches);
the parametric EB loop stops after :data:`MAX_EB_ITER` iterations. Every other quirk that changes numbers
is kept: the pooled variance divides by n, zero variances become 1, the convergence test uses signed
relative changes, the reference batch is returned unchanged.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import FedBiopsyError

log = logging.getLogger(__name__)

EB_CONVERGENCE = 1e-4  # neuroCombat's it_sol(conv=0.0001)
MAX_EB_ITER = 10_000
MODEL_FORMAT = "fedbiopsy-combat/1"


class CombatDataError(FedBiopsyError, ValueError):
    """Data or covariates that ComBat cannot use as they are."""


@dataclass(frozen=True)
class CombatOptions:
    """neuroCombat's options. ``batch``: the covariate holding the batch (None: each site is one batch)."""

    batch: str | None = None
    categorical: tuple[str, ...] = ()
    continuous: tuple[str, ...] = ()
    eb: bool = True
    parametric: bool = True
    mean_only: bool = False
    ref_batch: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "categorical", tuple(self.categorical))
        object.__setattr__(self, "continuous", tuple(self.continuous))
        names = [*self.categorical, *self.continuous]
        if self.batch is not None:
            names.append(self.batch)
        dupes = sorted({c for c in names if names.count(c) > 1})
        if dupes:
            raise CombatDataError(f"covariate(s) {dupes} named more than once among batch/categorical/continuous; "
                                  "name each column in one role only")

    @property
    def covariate_columns(self) -> tuple[str, ...]:
        """The covariate columns a site must hold (batch column first, when there is one)."""
        return ((self.batch,) if self.batch else ()) + self.categorical + self.continuous

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> CombatOptions:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise CombatDataError(f"unknown ComBat option(s) {unknown}")
        d = {**asdict(cls()), **data}
        return cls(batch=d["batch"], categorical=tuple(d["categorical"]), continuous=tuple(d["continuous"]),
                   eb=bool(d["eb"]), parametric=bool(d["parametric"]), mean_only=bool(d["mean_only"]),
                   ref_batch=d["ref_batch"])


@dataclass(frozen=True)
class CombatSpec:
    """Everything that fixes the design matrix, agreed before the fit: features, batches, levels, options."""

    options: CombatOptions
    features: tuple[str, ...]
    batches: tuple[str, ...]  # sorted
    batch_counts: tuple[int, ...]
    categorical_levels: tuple[tuple[str, ...], ...] = ()  # per options.categorical, sorted; the first is dropped
    batch_sites: tuple[tuple[str, ...], ...] = ()  # per batch, the sites holding it (federated fits only)

    @classmethod
    def build(cls, options: CombatOptions, features: Sequence[str], batch_counts: Mapping[str, int],
              levels: Mapping[str, Sequence[str]], batch_sites: Mapping[str, Sequence[str]] | None = None
              ) -> CombatSpec:
        """A spec from the (merged) batch counts and categorical levels; raises on what ComBat cannot fit."""
        batches = tuple(sorted(batch_counts))
        if len(features) < 2:
            raise CombatDataError(f"{len(features)} feature(s); ComBat's priors need at least 2 features")
        if len(set(features)) != len(features):
            raise CombatDataError("feature names repeat; give every feature column a unique name")
        if options.ref_batch is not None and options.ref_batch not in batches:
            raise CombatDataError(f"ref_batch {options.ref_batch!r} is not one of the batches {list(batches)}")
        sites = batch_sites or {}
        return cls(
            options=options,
            features=tuple(features),
            batches=batches,
            batch_counts=tuple(int(batch_counts[b]) for b in batches),
            categorical_levels=tuple(tuple(sorted(levels[c])) for c in options.categorical),
            batch_sites=tuple(tuple(sorted(sites.get(b, ()))) for b in batches) if sites else (),
        )

    @property
    def n_batch(self) -> int:
        return len(self.batches)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_cases(self) -> int:
        return int(sum(self.batch_counts))

    @property
    def ref_index(self) -> int | None:
        return None if self.options.ref_batch is None else self.batches.index(self.options.ref_batch)

    @property
    def design_columns(self) -> tuple[str, ...]:
        """Names of the design matrix's columns (batch one-hots, covariate one-hots, continuous)."""
        cats = tuple(f"{c}={lev}" for c, levels in zip(self.options.categorical, self.categorical_levels, strict=True)
                     for lev in levels[1:])
        return tuple(f"batch={b}" for b in self.batches) + cats + self.options.continuous

    def spans_sites(self) -> bool:
        """Whether some batch is held by more than one site (then the server runs the EB step)."""
        return any(len(s) > 1 for s in self.batch_sites)

    def sites_of(self, batch_index: int) -> str:
        """The sites holding a batch, for error messages."""
        if not self.batch_sites:
            return "(pooled)"
        return ", ".join(self.batch_sites[batch_index])

    def to_json(self) -> str:
        data = {
            "options": self.options.to_dict(), "features": list(self.features), "batches": list(self.batches),
            "batch_counts": list(self.batch_counts), "categorical_levels": [list(v) for v in self.categorical_levels],
            "batch_sites": [list(v) for v in self.batch_sites],
        }
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CombatSpec:
        d = json.loads(text)
        return cls(
            options=CombatOptions.from_dict(d["options"]), features=tuple(d["features"]),
            batches=tuple(d["batches"]), batch_counts=tuple(int(x) for x in d["batch_counts"]),
            categorical_levels=tuple(tuple(v) for v in d["categorical_levels"]),
            batch_sites=tuple(tuple(v) for v in d["batch_sites"]),
        )


# --------------------------------------------------------------------------------------------- design


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


# --------------------------------------------------------------------------------------------- moments


@dataclass(frozen=True)
class Moments:
    """Per-batch count, mean and centred sum of squares of each feature: rows = batches (count 0 = absent)."""

    n: np.ndarray  # (B,)
    mean: np.ndarray  # (B, p)
    m2: np.ndarray  # (B, p)

    @classmethod
    def of(cls, values: np.ndarray, index: np.ndarray, n_groups: int) -> Moments:
        """The moments of ``values`` (n x p) grouped by ``index`` (n,) into ``n_groups`` rows."""
        p = values.shape[1]
        n = np.bincount(index, minlength=n_groups).astype(np.int64)
        mean = np.zeros((n_groups, p))
        m2 = np.zeros((n_groups, p))
        for g in np.flatnonzero(n):
            rows = values[index == g]
            mean[g] = rows.mean(axis=0)
            m2[g] = np.square(rows - mean[g]).sum(axis=0)
        return cls(n, mean, m2)

    def merge(self, other: Moments) -> Moments:
        """Exact, stable merge of two disjoint groups of patients (Chan, Golub & LeVeque)."""
        n = self.n + other.n
        safe = np.where(n > 0, n, 1).astype(np.float64)[:, None]
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n[:, None] / safe)
        m2 = self.m2 + other.m2 + np.square(delta) * (self.n[:, None] * other.n[:, None] / safe)
        return Moments(n, np.where(n[:, None] > 0, mean, 0.0), np.where(n[:, None] > 0, m2, 0.0))


def merge_moments(parts: Sequence[Moments]) -> Moments:
    """The moments of the union of disjoint groups."""
    out = parts[0]
    for part in parts[1:]:
        out = out.merge(part)
    return out


# --------------------------------------------------------------------------------------------- batch step


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
        z2, z1 = np.zeros((n_batch, p)), np.zeros(n_batch)
        return cls(z2, z2.copy(), z1, z1.copy(), z1.copy(), z1.copy(), z2.copy(), z2.copy())

    def as_dict(self) -> dict[str, np.ndarray]:
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


def estimate_batches(moments: Moments, options: CombatOptions, ref_index: int | None,
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


# --------------------------------------------------------------------------------------------- the model


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
        est = estimate_batches(Moments.of(s, index, len(new)), self.spec.options, None)
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
