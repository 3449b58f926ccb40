"""Federated outcome analytics: k-means of the patients' signature, Kaplan-Meier and log-rank per cluster, Cox.

Drivers, each ``run_*(query, options)`` over any :class:`common.protocol.Query` (Flower in the outcomes
phase, :class:`common.protocol.InMemoryQuery` over :class:`OutcomesCohort` s in tests):

* :func:`run_kmeans`: ``kmeans_moments`` -> (``kmeans_local_centres``) -> ``kmeans_assign`` per Lloyd
  iteration until scikit-learn's stopping rules hold -> ``kmeans_labels`` (each site keeps its labels);
* :func:`run_survival`: ``survival_table`` -> Kaplan-Meier per group (lifelines' estimate) and log-rank;
* :func:`run_cox`: ``cox_moments`` -> ``cox_sums`` per Newton step (lifelines' CoxPHFitter, Efron ties), on
  the sites' covariate columns or on group indicators;
* :func:`run_outcomes`: the outcomes phase, all three in turn on one cohort of sites (Cox on clusters).

The site functions are :data:`OUTCOMES_STEPS` (:mod:`common.outcomes_site`); the maths are
:mod:`common.kmeans`, :mod:`common.survival` and :mod:`common.cox`. A query must send every round to the
sites that answered the first one and fail if one of them does not answer: the rounds sum over the cohort.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from common.config import OutcomesConfig
from common.cox import (
    CoxResult,
    ElasticNet,
    check_separation,
    cox_result,
    efron_derivatives,
    merge_cox_sums,
    newton_raphson,
)
from common.errors import ConfigError, ProtocolError
from common.kmeans import LloydLoop, kmeans_plusplus_from_summaries, random_centres
from common.outcomes_site import (
    COX_MOMENTS,
    COX_SUMS,
    KMEANS_ASSIGN,
    KMEANS_LABELS,
    KMEANS_LOCAL_CENTRES,
    KMEANS_MOMENTS,
    OUTCOMES_STEPS,
    SURVIVAL_TABLE,
    OutcomesCohort,
    cohort_from_arrays,
    cohorts_from_frames,
)
from common.pooled_moments import Moments, merge_moments
from common.protocol import Payload, Query
from common.survival import (
    BINNED,
    EXACT,
    LogRankResult,
    SurvivalTable,
    kaplan_meier,
    logrank_test,
    merge_survival_tables,
)

log = logging.getLogger(__name__)

__all__ = [
    "OUTCOMES_STEPS", "CoxResult", "CoxStart", "KMeansOptions", "KMeansResult", "KMeansSpace", "OutcomesCohort",
    "OutcomesResult", "SurvivalOptions", "SurvivalResult", "cohort_from_arrays", "cohorts_from_frames",
    "initial_centres", "run_cox", "run_kmeans", "run_outcomes", "run_survival", "server_cox_start",
    "server_kmeans_space",
]


# ============================================================================================ options


@dataclass(frozen=True)
class KMeansOptions:
    """Federated k-means: ``k`` clusters from ``init`` (``kmeans++``, ``random`` or ``given``), Lloyd's rules.

    ``standardise``: cluster on features z-scored by their pooled mean and sd; ``initial_centres`` (for
    ``given``) are in that space. ``tol`` is relative, as scikit-learn's (times the mean feature variance).
    """

    k: int = 2
    standardise: bool = True
    init: str = "kmeans++"
    initial_centres: Any = None  # (k, d) array-like, for init="given"
    local_centres: int = 4  # per site, for the federated k-means++
    max_iter: int = 300
    tol: float = 1e-4
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: OutcomesConfig) -> KMeansOptions:
        """The k-means options of a study's ``outcomes`` section."""
        if cfg.init == "given" and len(cfg.initial_centres) != cfg.k:
            raise ConfigError("study config", f"outcomes.initial_centres has {len(cfg.initial_centres)} row(s), "
                              f"expected k={cfg.k}", "give k rows of one value per feature")
        return cls(k=cfg.k, standardise=cfg.standardise, init=cfg.init, initial_centres=cfg.initial_centres or None,
                   local_centres=cfg.local_centres, max_iter=cfg.max_iter, tol=cfg.tol, seed=cfg.seed)


@dataclass(frozen=True)
class SurvivalOptions:
    """How event times leave the sites: exact (``time_bin_days`` None) or binned to that many days."""

    time_bin_days: float | None = None
    alpha: float = 0.05  # of the Kaplan-Meier bands and Cox intervals

    @property
    def mode(self) -> str:
        return EXACT if self.time_bin_days is None else BINNED

    @classmethod
    def from_config(cls, cfg: OutcomesConfig, all_exact: bool) -> SurvivalOptions:
        """Exact times only when ``exact_times`` is "auto" and every site's policy allows them; else binned."""
        exact = cfg.exact_times == "auto" and all_exact
        return cls(time_bin_days=None if exact else cfg.time_bin_days, alpha=cfg.alpha)

    def request(self) -> Payload:
        """The part of every survival and Cox request that fixes the released data."""
        out: Payload = {"mode": self.mode}
        if self.time_bin_days is not None:
            out["time_bin_days"] = float(self.time_bin_days)
        return out


# ============================================================================================ k-means


@dataclass(frozen=True)
class KMeansSpace:
    """The clustering space fixed by the first round: features, standardisation, tolerance, the sites."""

    features: tuple[str, ...]
    sources: dict[str, str]  # site -> the file its features came from
    exact: dict[str, bool]  # site -> its policy allows exact outcomes
    moments: Moments  # pooled, of the features in their own units
    shift: np.ndarray
    scale: np.ndarray
    tol: float  # absolute

    def request(self) -> Payload:
        """What every later k-means round carries: the standardisation."""
        return {"mean": self.shift, "scale": self.scale}


def server_kmeans_space(replies: dict[str, Payload], options: KMeansOptions) -> KMeansSpace:
    """Check the sites cluster on the same features; pooled standardisation and scikit-learn's tolerance."""
    if not replies:
        raise ProtocolError("(none)", "no site answered the k-means moments round")
    sites = sorted(replies)
    features = [str(f) for f in replies[sites[0]].get("features", [])]  # type: ignore[attr-defined]
    for s in sites[1:]:
        if [str(f) for f in replies[s].get("features", [])] != features:  # type: ignore[attr-defined]
            raise ProtocolError(s, "its feature columns differ from those of site " + repr(sites[0]),
                                "use the same feature table (signature) at every site, or set outcomes.features")
    moments = merge_moments(replies)
    sd = moments.std(ddof=0)
    if options.standardise:
        shift, scale = moments.mean, np.where(sd > 0, sd, 1.0)
    else:
        shift, scale = np.zeros_like(sd), np.ones_like(sd)
    var_t = moments.var(ddof=0) / scale**2
    tol = 0.0 if options.tol == 0 else float(np.mean(var_t) * options.tol)
    return KMeansSpace(features=tuple(features), sources={s: str(replies[s].get("source")) for s in sites},
                       exact={s: bool(replies[s].get("exact_outcomes")) for s in sites}, moments=moments,
                       shift=shift, scale=scale, tol=tol)


def initial_centres(query: Query, options: KMeansOptions, space: KMeansSpace) -> np.ndarray:
    """The Lloyd loop's start: federated k-means++ (one round), seeded random draws, or the given centres."""
    d = len(space.features)
    if options.init == "kmeans++":
        replies = query(KMEANS_LOCAL_CENTRES, {**space.request(), "n_centres": options.local_centres,
                                               "seed": options.seed})
        return kmeans_plusplus_from_summaries(replies, options.k, options.seed)
    if options.init == "given":
        init = np.asarray(options.initial_centres, dtype=np.float64)
        if init.shape != (options.k, d) or not np.all(np.isfinite(init)):
            raise ProtocolError("(server)", f"outcomes.initial_centres has shape {init.shape} (or non-finite values), "
                                f"expected ({options.k}, {d}) for k={options.k} and features {list(space.features)}",
                                "give k rows of one value per feature")
        return init
    if options.init == "random":
        sd = space.moments.std(ddof=0)
        return random_centres(options.k, (space.moments.mean - space.shift) / space.scale, sd / space.scale,
                              options.seed)
    raise ProtocolError("(server)", f"unknown k-means init {options.init!r}", "use kmeans++, random or given")


@dataclass(frozen=True)
class KMeansResult:
    """A federated k-means run: the space, the start, the final centres (standardised space) and the loop."""

    space: KMeansSpace
    options: KMeansOptions
    initial_centres: np.ndarray
    centres: np.ndarray
    n_iter: int
    converged: bool
    strict: bool  # stopped because no label changed
    suppressed: int  # cluster cells withheld by sites, over all rounds
    empty: tuple[int, ...]
    inertia: float  # in the clustering space, summed over the sites
    cases: dict[str, int]  # patients labelled per site
    held: tuple[str, ...] = ()  # sites whose final partition could not be released (they keep an earlier one)

    @property
    def sites(self) -> list[str]:
        return sorted(self.space.sources)

    @property
    def centres_original_units(self) -> np.ndarray:
        return self.centres * self.space.scale + self.space.shift


def run_kmeans(query: Query, options: KMeansOptions) -> KMeansResult:
    """Federated Lloyd k-means; equal to scikit-learn's (``algorithm="lloyd"``) from the same start.

    The sites keep their labels (:meth:`OutcomesCohort.keep_labels`); only sums, counts and the inertia leave.
    """
    space = server_kmeans_space(query(KMEANS_MOMENTS, {}), options)
    init = initial_centres(query, options, space)
    loop = LloydLoop(centres=init, tol=space.tol, max_iter=options.max_iter)
    while not loop.update(query(KMEANS_ASSIGN, {**space.request(), **loop.request()})):
        pass
    final = query(KMEANS_LABELS, {**space.request(), "centres": loop.centres})
    cases = {s: int(r["n"]) for s, r in final.items()}  # type: ignore[call-overload]
    log.info("federated k-means: %d site(s), %d patient(s), k=%d, %d iteration(s), converged %s", len(cases),
             sum(cases.values()), options.k, loop.n_iter, loop.converged)
    return KMeansResult(space=space, options=options, initial_centres=init, centres=loop.centres,
                        n_iter=loop.n_iter, converged=loop.converged, strict=loop.strict,
                        suppressed=loop.suppressed, empty=loop.empty,
                        inertia=float(np.sum([float(r["inertia"]) for r in final.values()  # type: ignore[arg-type]
                                              if "inertia" in r])),
                        cases=cases, held=tuple(sorted(s for s, r in final.items() if r.get("held"))))


# ============================================================================================ survival


@dataclass(frozen=True)
class SurvivalResult:
    """The pooled event table, each group's Kaplan-Meier curve and the log-rank test (None: not computable)."""

    options: SurvivalOptions
    table: SurvivalTable
    curves: dict[Any, pd.DataFrame]
    logrank: LogRankResult | None
    cases: dict[str, int]  # released patients per site
    suppressed_groups: dict[str, list] = field(default_factory=dict)

    def pooled(self) -> pd.DataFrame:
        """Kaplan-Meier of all groups together (lifelines on the pooled released data)."""
        return kaplan_meier(self.table, alpha=self.options.alpha)


def run_survival(query: Query, options: SurvivalOptions) -> SurvivalResult:
    """Kaplan-Meier per group and the log-rank test from the sites' event tables (one round)."""
    replies = query(SURVIVAL_TABLE, options.request())
    table = merge_survival_tables(replies)
    curves = {g: kaplan_meier(table, g, options.alpha) for g in table.groups}
    test = logrank_test(table) if len(table.groups) >= 2 and table.events.sum() > 0 else None
    return SurvivalResult(options=options, table=table, curves=curves, logrank=test,
                          cases={s: int(r["n"]) for s, r in replies.items()},  # type: ignore[call-overload]
                          suppressed_groups={s: list(r.get("suppressed_groups", []))  # type: ignore[call-overload]
                                             for s, r in replies.items()})


# ============================================================================================ Cox


@dataclass(frozen=True)
class CoxStart:
    """What the first Cox round fixes: covariate names, pooled normalisation, the pooled event times."""

    names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    event_times: np.ndarray
    n: int = 0  # pooled patients (lifelines scales its penalty by them)


def _covariate_names(replies: dict[str, Payload], groups: Sequence | None, prefix: str) -> tuple[str, ...]:
    if groups is not None:
        return tuple(f"{prefix}{g}" for g in list(groups)[1:])
    sites = sorted(replies)
    first = sites[0]
    names = tuple(str(c) for c in replies[first].get("covariates", []))  # type: ignore[attr-defined]
    for site in sites[1:]:
        theirs = tuple(str(c) for c in replies[site].get("covariates", []))  # type: ignore[attr-defined]
        if theirs != names:
            raise ProtocolError(site, f"covariates {list(theirs)} differ from those of site {first!r} ({list(names)})",
                                "use the same covariate columns, in the same order, at every site")
    return names


def server_cox_start(replies: dict[str, Payload], groups: Sequence | None = None,
                     prefix: str = "cluster_", penalised: bool = False) -> CoxStart:
    """Check the first Cox round: same covariates, none constant or (unpenalised) separated, at least one event."""
    if not replies:
        raise ProtocolError("(none)", "no site answered the Cox moments round")
    names = _covariate_names(replies, groups, prefix)
    moments = merge_moments(replies)
    scale = moments.std(ddof=1)
    flat = [n for n, sd in zip(names, scale, strict=True) if not sd > 0]
    if flat:
        raise ProtocolError("(pooled)", f"covariate(s) {flat} are constant over the sites {sorted(replies)}",
                            "drop them from the model")
    if not penalised:  # a penalty keeps a separated covariate's coefficient finite, as in lifelines
        check_separation(replies, names)
    tau = np.unique(np.concatenate([np.atleast_1d(np.asarray(r.get("event_times", []), dtype=np.float64))
                                    for r in replies.values()]))
    if tau.size == 0:
        raise ProtocolError("(pooled)", f"no event at any of the sites {sorted(replies)}", "Cox needs events")
    return CoxStart(names=names, mean=moments.mean, scale=scale, event_times=tau, n=moments.n)


def run_cox(query: Query, options: SurvivalOptions, groups: Sequence | None = None,
            prefix: str = "cluster_", penalizer: float | Sequence[float] = 0.0, l1_ratio: float = 0.0) -> CoxResult:
    """Cox proportional hazards (Efron's ties) by federated Newton-Raphson: lifelines'
    ``CoxPHFitter(penalizer=penalizer, l1_ratio=l1_ratio)``.

    Covariates: the sites' covariate columns, or (``groups``, the pooled group labels) indicators of every
    group but the first, named ``<prefix><label>``. The prognosis phase's driver is
    :func:`common.prognosis.run_prognosis` (the same maths, on a split of the sites' covariate tables).
    """
    request = options.request()
    if groups is not None:
        request["groups"] = list(groups)
    probe = ElasticNet(penalizer if np.isscalar(penalizer) else tuple(penalizer), l1_ratio)  # type: ignore[arg-type]
    start = server_cox_start(query(COX_MOMENTS, request), groups, prefix, penalised=probe.active)
    penalty = probe.for_fit(start.names, start.n)
    step = {**request, "mean": start.mean, "scale": start.scale, "event_times": start.event_times}

    def evaluate(beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        replies = query(COX_SUMS, {**step, "beta": beta})
        return efron_derivatives(merge_cox_sums(replies, start.event_times.size, len(start.names)), beta)

    return cox_result(start.names, newton_raphson(evaluate, len(start.names), penalty=penalty), start.scale)


# ============================================================================================ the phase


@dataclass(frozen=True)
class OutcomesResult:
    """The outcomes phase: clusters, their survival, and Cox on cluster membership (or why it is not estimable)."""

    kmeans: KMeansResult
    survival: SurvivalResult
    cox: CoxResult | None
    cox_error: str | None
    reference: int | None  # the Cox reference cluster

    @property
    def mode(self) -> str:
        return self.survival.options.mode


def run_outcomes(query: Query, cfg: OutcomesConfig) -> OutcomesResult:
    """k-means of the sites' features, then Kaplan-Meier and log-rank per cluster, then Cox on the clusters."""
    kmeans = run_kmeans(query, KMeansOptions.from_config(cfg))
    options = SurvivalOptions.from_config(cfg, all(kmeans.space.exact.values()))
    survival = run_survival(query, options)
    table = survival.table
    groups = [int(g) for g in table.groups]
    cox: CoxResult | None = None
    error: str | None = None
    no_events = [g for g, e in zip(groups, table.events, strict=True) if e == 0]
    if len(groups) < 2:
        error = "fewer than two clusters hold patients"
    elif no_events:
        error = f"cluster(s) {no_events} have no events; their hazard ratio is not estimable"
    else:
        try:
            cox = run_cox(query, options, groups)
        except ProtocolError as err:
            log.warning("outcomes: Cox model not estimable: %s", err)
            error = str(err)
    return OutcomesResult(kmeans=kmeans, survival=survival, cox=cox, cox_error=error,
                          reference=groups[0] if groups else None)
