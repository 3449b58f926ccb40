"""Federated ComBat, exactly equal to neuroCombat on the pooled data (d-ComBat, Chen et al. 2022).

Site steps (``site_*``) and server steps (``server_*``) are pure functions over a site's cohort and
payloads (flat dicts of numpy arrays and scalars); :func:`run_combat` drives them through any transport
(in process, or Flower queries). Rounds, by query action:

=================  =======================================================  ===============================
action             a site sends (aggregates only)                           the server computes
=================  =======================================================  ===============================
combat_summary     feature names, patients per batch, categorical levels    the design (:class:`CombatSpec`)
combat_fit         W'W, W'Y, per-batch count/mean/centred SS of the data    OLS beta, grand mean
combat_var         per-batch residual sums of squares                       pooled variance
combat_batch       per-batch count/mean/centred SS of standardised data     EB estimates of every batch
                   (only when some batch is held by several sites)
combat_apply       its batches' estimates (EB run at the site when each     the stored model
                   batch lies in one site); it harmonises its own data
=================  =======================================================  ===============================

Privacy: every array is a sum over patients of a batch portion or of the whole site, and the site refuses
(:class:`PolicyError`, rule ``min_cohort``) unless every cell of batch x categorical levels that it holds has
at least ``min_cohort`` patients: all the indicator sums of W'Y are then sums over such cells.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.combat_estimator import ComBat
from common.combat_model import (
    BatchEstimates,
    CombatModel,
    CombatOptions,
    CombatSpec,
    Moments,
    adjust,
    batch_index,
    covariate_effect,
    design_matrix,
    estimate_batches,
    grand_mean,
    merge_moments,
    pooled_variance,
    solve_design,
    standardise,
)
from common.config import HarmonisationConfig
from common.errors import PolicyError, ProtocolError
from common.feature_matrix import feature_matrix

log = logging.getLogger(__name__)

Payload = dict[str, object]
Query = Callable[[str, Payload], Mapping[str, Payload]]

SUMMARY, FIT, VAR, BATCH, APPLY = "combat_summary", "combat_fit", "combat_var", "combat_batch", "combat_apply"
ACTIONS: tuple[str, ...] = (SUMMARY, FIT, VAR, BATCH, APPLY)
CONSTANT_RTOL = 1e-10  # a batch's feature counts as constant when its sd <= CONSTANT_RTOL * |mean|

__all__ = [
    "ACTIONS", "ComBat", "CombatModel", "CombatOptions", "CombatResult", "CombatSpec", "SiteCohort", "make_cohort",
    "options_from_config", "run_combat", "server_collect", "server_eb", "server_fit", "server_spec", "server_var",
    "site_apply", "site_batch", "site_fit", "site_summary", "site_var",
]


def options_from_config(cfg: HarmonisationConfig) -> CombatOptions:
    """The ComBat options of a study's ``harmonisation`` section."""
    return CombatOptions(batch=cfg.batch, categorical=cfg.categorical, continuous=cfg.continuous, eb=cfg.eb,
                         parametric=cfg.parametric, mean_only=cfg.mean_only, ref_batch=cfg.ref_batch)


# ============================================================================================ site side


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
    raw = Moments.of(y, batch_index(spec.batches, cohort.labels), spec.n_batch)
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
    mom = Moments.of(s, index, spec.n_batch)
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
        est = estimate_batches(Moments.of(s, index, spec.n_batch), spec.options, spec.ref_index,
                               rows=[int(b) for b in mine])
        reply.update(est.as_dict())
        reply["batch_n"] = counts.astype(np.int64)
    out = adjust(y, s, mod, index, est, grand, var, spec.ref_index)
    return pd.DataFrame(out, index=cohort.features.index, columns=list(spec.features)), reply


# ============================================================================================ server side


def _reply_array(site: str, reply: Mapping[str, object], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in reply:
        raise ProtocolError(site, f"ComBat reply lacks {key!r}", "run the same fedbiopsy version at every site")
    value = np.asarray(reply[key], dtype=np.float64)
    if value.shape != shape:
        raise ProtocolError(site, f"ComBat reply {key!r} has shape {value.shape}, expected {shape}",
                            "run the same fedbiopsy version and study config at every site")
    if not np.all(np.isfinite(value)):
        raise ProtocolError(site, f"ComBat reply {key!r} is not finite", "check the site's feature table")
    return value


def _check_counts(replies: Mapping[str, Mapping[str, object]], spec: CombatSpec) -> dict[str, np.ndarray]:
    counts = {s: _reply_array(s, r, "batch_n", (spec.n_batch,)) for s, r in replies.items()}
    if not np.array_equal(sum(counts.values()), np.asarray(spec.batch_counts, dtype=np.float64)):
        raise ProtocolError(", ".join(sorted(counts)), "patients per batch changed between ComBat rounds",
                            "keep the feature tables fixed while the harmonisation phase runs")
    return counts


def _names(reply: Mapping[str, object], site: str) -> list[str]:
    value = reply.get("features")
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(site, "ComBat summary lacks the feature names", "run the same fedbiopsy version everywhere")
    return [str(f) for f in value]


def server_spec(replies: Mapping[str, Mapping[str, object]], options: CombatOptions) -> CombatSpec:
    """Round 0: check the sites agree on features, and fix batches and levels; raises naming the site."""
    if not replies:
        raise ProtocolError("(none)", "no site answered the ComBat summary query")
    sites = sorted(replies)
    first = sites[0]
    features = _names(replies[first], first)
    for site in sites[1:]:
        theirs = _names(replies[site], site)
        if set(theirs) != set(features) or len(theirs) != len(features):
            missing = [f for f in features if f not in set(theirs)]
            extra = [f for f in theirs if f not in set(features)]
            raise ProtocolError(site, f"its feature columns differ from site {first!r}'s: missing {missing[:10]}, "
                                f"extra {extra[:10]}", "extract the same features with the same settings everywhere")
    counts: dict[str, int] = {}
    holders: dict[str, list[str]] = {}
    levels: dict[str, set[str]] = {c: set() for c in options.categorical}
    for site in sites:
        for batch, n in json.loads(str(replies[site]["batches"])).items():
            counts[batch] = counts.get(batch, 0) + int(n)
            holders.setdefault(batch, []).append(site)
        for col, lv in json.loads(str(replies[site]["levels"])).items():
            levels[col].update(lv)
    for batch, n in sorted(counts.items()):
        if n < 2:
            raise ProtocolError(", ".join(holders[batch]), f"batch {batch!r} has {n} patient; ComBat needs at least 2 "
                                "per batch to estimate its scale", "merge it with a similar batch or leave it out")
    if options.ref_batch is not None and options.ref_batch not in counts:
        raise ProtocolError("(study)", f"ref_batch {options.ref_batch!r} is not a batch of any site "
                            f"(batches: {sorted(counts)})", "name an existing batch in harmonisation.ref_batch")
    return CombatSpec.build(options, features, counts, {c: sorted(v) for c, v in levels.items()}, holders)


def server_fit(replies: Mapping[str, Mapping[str, object]], spec: CombatSpec) -> tuple[np.ndarray, np.ndarray]:
    """Round 1: the pooled OLS fit (beta) and grand mean; raises on a feature constant within a batch."""
    q, p, nb = len(spec.design_columns), spec.n_features, spec.n_batch
    _check_counts(replies, spec)
    wtw = sum(_reply_array(s, r, "wtw", (q, q)) for s, r in replies.items())
    wty = sum(_reply_array(s, r, "wty", (q, p)) for s, r in replies.items())
    raw = merge_moments([Moments(np.asarray(_reply_array(s, r, "batch_n", (nb,)), dtype=np.int64),
                                 _reply_array(s, r, "raw_mean", (nb, p)), _reply_array(s, r, "raw_m2", (nb, p)))
                         for s, r in sorted(replies.items())])
    n = np.maximum(raw.n, 1)[:, None]
    constant = raw.m2 <= n * np.square(CONSTANT_RTOL * raw.mean)
    for b in np.flatnonzero(constant.any(axis=1)):
        names = [f for f, c in zip(spec.features, constant[b], strict=True) if c]
        raise ProtocolError(spec.sites_of(int(b)), f"feature(s) {names[:10]} are constant within batch "
                            f"{spec.batches[b]!r}", "drop them before harmonising (ComBat cannot scale a constant)")
    beta = solve_design(wtw, wty, spec)  # type: ignore[arg-type]
    return beta, grand_mean(beta, spec)


def server_var(replies: Mapping[str, Mapping[str, object]], spec: CombatSpec) -> np.ndarray:
    """Round 2: the pooled residual variance of each feature."""
    _check_counts(replies, spec)
    rss = sum(_reply_array(s, r, "rss", (spec.n_batch, spec.n_features)) for s, r in replies.items())
    return pooled_variance(np.asarray(rss), spec)


def server_eb(replies: Mapping[str, Mapping[str, object]], spec: CombatSpec) -> BatchEstimates:
    """Round 3: EB estimates of every batch from merged moments of the standardised data."""
    nb, p = spec.n_batch, spec.n_features
    _check_counts(replies, spec)
    mom = merge_moments([Moments(np.asarray(_reply_array(s, r, "batch_n", (nb,)), dtype=np.int64),
                                 _reply_array(s, r, "s_mean", (nb, p)), _reply_array(s, r, "s_m2", (nb, p)))
                         for s, r in sorted(replies.items())])
    return estimate_batches(mom, spec.options, spec.ref_index)


def server_collect(replies: Mapping[str, Mapping[str, object]], spec: CombatSpec) -> BatchEstimates:
    """Final round without round 3: each batch's estimates, from the site that holds it."""
    nb, p = spec.n_batch, spec.n_features
    counts = _check_counts(replies, spec)
    out = BatchEstimates.empty(nb, p)
    for site, reply in sorted(replies.items()):
        rows = [int(b) for b in np.flatnonzero(counts[site])]
        arrays = {}
        for key in BatchEstimates.FIELDS:
            shape = (nb, p) if getattr(out, key).ndim == 2 else (nb,)
            if key in ("a_prior", "b_prior") and spec.options.mean_only:  # NaN by definition
                arrays[key] = np.asarray(reply.get(key, np.full(shape, np.nan)), dtype=np.float64)
            else:
                arrays[key] = _reply_array(site, reply, key, shape)
        out = out.take_rows(rows, BatchEstimates(**arrays))
    return out


# ============================================================================================ driver


@dataclass(frozen=True)
class CombatResult:
    """What a federated ComBat run gives the server: the fitted model and each site's case count."""

    model: CombatModel
    cases: dict[str, int]
    rounds: tuple[str, ...]


def run_combat(query: Query, options: CombatOptions) -> CombatResult:
    """Drive the rounds through ``query(action, payload) -> {site_id: reply}``; the sites harmonise their data.

    ``query`` must send every round after the first to the sites that answered the first, and fail if one
    of them does not answer (a partial sum would be silently wrong).
    """
    rounds = [SUMMARY]
    summaries = query(SUMMARY, {"options": json.dumps(options.to_dict(), sort_keys=True)})
    spec = server_spec(summaries, options)
    request: Payload = {"spec": spec.to_json()}
    beta, grand = server_fit(query(FIT, request), spec)
    request.update(beta=beta, grand_mean=grand)
    var_pooled = server_var(query(VAR, request), spec)
    request["var_pooled"] = var_pooled
    rounds += [FIT, VAR]
    if spec.spans_sites():
        estimates = server_eb(query(BATCH, request), spec)
        request.update(estimates.as_dict())
        rounds.append(BATCH)
        query(APPLY, request)
    else:
        estimates = server_collect(query(APPLY, request), spec)
    rounds.append(APPLY)
    model = CombatModel(spec=spec, beta=beta, grand_mean=grand, var_pooled=var_pooled, estimates=estimates)
    cases = {s: int(r["n_cases"]) for s, r in summaries.items()}  # type: ignore[call-overload]
    log.info("federated ComBat: %d site(s), %d batch(es), %d feature(s), rounds %s", len(cases), spec.n_batch,
             spec.n_features, rounds)
    return CombatResult(model, cases, tuple(rounds))


SITE_FUNCTIONS = {SUMMARY: site_summary, FIT: site_fit, VAR: site_var, BATCH: site_batch}
