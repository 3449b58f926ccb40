"""The site steps of federated ComBat: a site's validated cohort, and what it sends in each round (aggregates only).

Every function here runs at the site over its :class:`SiteCohort` and the server's request; the privacy rule
is :func:`check_cells`: the site refuses (:class:`PolicyError`, rule ``min_cohort``) unless every cell of
batch x categorical levels that it holds has at least ``min_cohort`` patients, so that every array sent is a
sum over such cells. The rounds and their order are :func:`common.harmonisation.run_harmonisation`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.combat_design import batch_index, covariate_effect, design_matrix, standardise
from common.combat_eb import BatchEstimates, adjust, estimate_batches
from common.combat_spec import CombatOptions, CombatSpec
from common.errors import PolicyError, ProtocolError
from common.feature_matrix import feature_matrix
from common.pooled_moments import GroupMoments
from common.protocol import Payload


@dataclass(frozen=True)
class SiteCohort:
    """A site's feature table and covariates, validated (never leaves the site)."""

    site_id: str
    features: pd.DataFrame  # patients x features, float64
    covariates: pd.DataFrame | None  # same rows
    labels: tuple[str, ...]  # batch of each patient
    options: CombatOptions

    @property
    def n(self) -> int:
        """The number of patients."""
        return len(self.features)


def make_cohort(site_id: str, features: pd.DataFrame, covariates: pd.DataFrame | None,
                options: CombatOptions) -> SiteCohort:
    """Validate a site's inputs; raises :class:`ProtocolError` naming the site, the column and the fix."""
    values = feature_matrix(site_id, features)
    cols = [str(c) for c in features.columns]
    table = pd.DataFrame(values, index=features.index.astype(str), columns=cols)
    needed = options.covariate_columns
    cov: pd.DataFrame | None = None
    if needed:
        if covariates is None:
            raise ProtocolError(site_id, f"covariates {list(needed)} are required but none were given",
                                "provide the clinical table")
        missing = [c for c in needed if c not in covariates.columns]
        if missing:
            raise ProtocolError(site_id, f"covariate column(s) {missing} are missing", "add them to clinical.csv")
        cov = covariates.copy()
        cov.index = cov.index.astype(str)
        absent = table.index.difference(cov.index)
        if len(absent):
            raise ProtocolError(site_id, f"{len(absent)} patient(s) of the feature table have no covariate row",
                                "add their rows to clinical.csv or drop them from the feature table")
        cov = cov.loc[table.index, list(needed)]
        for col in needed:
            if cov[col].isna().any():
                raise ProtocolError(site_id, f"covariate {col!r} has {int(cov[col].isna().sum())} missing value(s)",
                                    "fill them or leave those patients out")
        for col in options.continuous:
            num = pd.to_numeric(cov[col], errors="coerce")
            if not np.all(np.isfinite(num.to_numpy(dtype=np.float64))):
                raise ProtocolError(site_id, f"continuous covariate {col!r} has non-numeric values",
                                    "store numbers only, or declare it categorical")
            cov[col] = num.astype(np.float64)
    labels = (site_id,) * len(table) if options.batch is None else tuple(cov[options.batch].astype(str))  # type: ignore[index]
    return SiteCohort(site_id, table, cov, labels, options)


def check_cells(cohort: SiteCohort, min_cohort: int) -> None:
    """Refuse unless the site and every batch x categorical-level cell it holds has >= ``min_cohort`` patients."""
    if cohort.n < min_cohort:
        raise PolicyError(cohort.site_id, "min_cohort",
                          f"{cohort.n} patient(s) in the feature table, policy needs at least {min_cohort}")
    opts = cohort.options
    keys = pd.DataFrame({"batch": cohort.labels}, index=cohort.features.index)
    for col in opts.categorical:
        keys[col] = cohort.covariates[col].astype(str)  # type: ignore[index]
    counts = keys.value_counts()
    small = counts[counts < min_cohort]
    if len(small):
        cells = [", ".join(f"{k}={v}" for k, v in zip(keys.columns, idx if isinstance(idx, tuple) else (idx,),
                                                        strict=True)) for idx in small.index[:5]]
        raise PolicyError(cohort.site_id, "min_cohort",
                          f"{len(small)} group(s) of batch x categorical covariates hold fewer than {min_cohort} "
                          f"patients ({'; '.join(cells)}); merge rare levels or drop the covariate")


def _request_spec(cohort: SiteCohort, request: Mapping[str, object]) -> CombatSpec:
    if "spec" not in request:
        raise ProtocolError(cohort.site_id, "the request carries no ComBat spec", "run the same fedbiopsy everywhere")
    spec = CombatSpec.from_json(str(request["spec"]))
    if spec.options != cohort.options:
        raise ProtocolError(cohort.site_id, f"the server asks for ComBat options {spec.options} but the study "
                            f"config gives {cohort.options}", "send the same study config to every site")
    return spec


def _matrix(cohort: SiteCohort, spec: CombatSpec) -> np.ndarray:
    have = set(cohort.features.columns)
    missing = [f for f in spec.features if f not in have]
    extra = sorted(have - set(spec.features))
    if missing or extra:
        raise ProtocolError(cohort.site_id, f"feature columns differ from the study's: missing {missing[:10]}, "
                            f"extra {extra[:10]}", "extract the same features at every site")
    return cohort.features[list(spec.features)].to_numpy()


def _array(request: Mapping[str, object], key: str, site: str) -> np.ndarray:
    if key not in request:
        raise ProtocolError(site, f"the request lacks {key!r}", "run the same fedbiopsy version everywhere")
    return np.asarray(request[key], dtype=np.float64)


def site_summary(cohort: SiteCohort, request: Mapping[str, object], min_cohort: int) -> Payload:
    """Round 0: the feature names, patients per batch and categorical levels of this site."""
    asked = CombatOptions.from_dict(json.loads(str(request.get("options", "{}"))))
    if asked != cohort.options:
        raise ProtocolError(cohort.site_id, f"the server asks for ComBat options {asked} but the study config gives "
                            f"{cohort.options}", "send the same study config to every site")
    check_cells(cohort, min_cohort)
    batches = pd.Series(cohort.labels).value_counts().sort_index()
    levels = {c: sorted(set(cohort.covariates[c].astype(str))) for c in cohort.options.categorical}  # type: ignore[index]
    return {
        "features": [str(c) for c in cohort.features.columns],
        "n_cases": cohort.n,
        "batches": json.dumps({str(k): int(v) for k, v in batches.items()}, sort_keys=True),
        "levels": json.dumps(levels, sort_keys=True),
    }


def site_fit(cohort: SiteCohort, request: Mapping[str, object], min_cohort: int) -> Payload:
    """Round 1: the design crossproducts W'W, W'Y and per-batch moments of the data."""
    check_cells(cohort, min_cohort)
    spec = _request_spec(cohort, request)
    y = _matrix(cohort, spec)
    w = design_matrix(spec, cohort.labels, cohort.covariates)
    raw = GroupMoments.of(y, batch_index(spec.batches, cohort.labels), spec.n_batch)
    return {"n_cases": cohort.n, "wtw": w.T @ w, "wty": w.T @ y, "batch_n": raw.n,
            "raw_mean": raw.mean, "raw_m2": raw.m2}


def site_var(cohort: SiteCohort, request: Mapping[str, object], min_cohort: int) -> Payload:
    """Round 2: per-batch residual sums of squares under the pooled fit."""
    check_cells(cohort, min_cohort)
    spec = _request_spec(cohort, request)
    y = _matrix(cohort, spec)
    beta = _array(request, "beta", cohort.site_id)
    index = batch_index(spec.batches, cohort.labels)
    resid = y - design_matrix(spec, cohort.labels, cohort.covariates) @ beta
    rss = np.zeros((spec.n_batch, spec.n_features))
    np.add.at(rss, index, np.square(resid))
    return {"n_cases": cohort.n, "batch_n": np.bincount(index, minlength=spec.n_batch).astype(np.int64), "rss": rss}


def _standardised(cohort: SiteCohort, spec: CombatSpec, request: Mapping[str, object]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    y = _matrix(cohort, spec)
    beta = _array(request, "beta", cohort.site_id)
    grand = _array(request, "grand_mean", cohort.site_id)
    var = _array(request, "var_pooled", cohort.site_id)
    mod = covariate_effect(spec, beta, cohort.covariates, cohort.n)
    return y, standardise(y, mod, grand, var), mod, grand, var, batch_index(spec.batches, cohort.labels)


def site_batch(cohort: SiteCohort, request: Mapping[str, object], min_cohort: int) -> Payload:
    """Round 3 (batches spanning sites): per-batch count, mean and centred SS of the standardised data."""
    check_cells(cohort, min_cohort)
    spec = _request_spec(cohort, request)
    _, s, _, _, _, index = _standardised(cohort, spec, request)
    mom = GroupMoments.of(s, index, spec.n_batch)
    return {"n_cases": cohort.n, "batch_n": mom.n, "s_mean": mom.mean, "s_m2": mom.m2}


def site_apply(cohort: SiteCohort, request: Mapping[str, object], min_cohort: int) -> tuple[pd.DataFrame, Payload]:
    """Final round: harmonise this site's data; returns the table (stays here) and the reply.

    With the server's EB estimates in the request they are applied; otherwise every batch of this site
    lies wholly here, and the site runs the EB step for its own batches and reports their estimates.
    """
    check_cells(cohort, min_cohort)
    spec = _request_spec(cohort, request)
    y, s, mod, grand, var, index = _standardised(cohort, spec, request)
    reply: Payload = {"n_cases": cohort.n}
    if "gamma_star" in request:
        est = BatchEstimates(**{k: _array(request, k, cohort.site_id) for k in BatchEstimates.FIELDS})
    else:
        mine = np.flatnonzero(np.bincount(index, minlength=spec.n_batch))
        counts = np.bincount(index, minlength=spec.n_batch)
        split = [spec.batches[b] for b in mine if counts[b] != spec.batch_counts[b]]
        if split:
            raise ProtocolError(cohort.site_id, f"batch(es) {split} are also held by other sites but the server "
                                "sent no EB estimates", "run the combat_batch round first")
        est = estimate_batches(GroupMoments.of(s, index, spec.n_batch), spec.options, spec.ref_index,
                               rows=[int(b) for b in mine])
        reply.update(est.as_dict())
        reply["batch_n"] = counts.astype(np.int64)
    out = adjust(y, s, mod, index, est, grand, var, spec.ref_index)
    return pd.DataFrame(out, index=cohort.features.index, columns=list(spec.features)), reply
