"""In-process federated outcome analytics: the sites' and the server's steps of :mod:`common` called in turn.

Each site's data stays in its own dict entry and only reaches the server through the site steps'
aggregate replies, exactly as over Flower (``client/steps/outcomes.py``, ``server/phases/outcomes.py``).
Re-exported by :mod:`simulations.inprocess`.

Keyword options shared by the survival runners: ``min_cohort`` (a site with fewer patients refuses, as
under the default site policy), ``time_bin_days`` (bin the times, e.g. 7) and ``suppress`` (merge cells of
fewer than ``min_cohort`` patients, see :func:`common.survival.release_times`). The defaults are the exact
protocol, equal to lifelines / scikit-learn on the pooled data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from common.cox import (
    CoxResult,
    check_separation,
    cox_result,
    efron_derivatives,
    merge_cox_sums,
    newton_raphson,
    site_cox_summary,
    site_cox_sums,
    site_event_times,
)
from common.errors import ProtocolError
from common.kmeans import (
    LloydLoop,
    assign_labels,
    check_centres,
    kmeans_plusplus_from_summaries,
    kmeans_tolerance,
    site_cluster_sums,
    site_local_centres,
)
from common.pooled_moments import check_matrix, merge_moments, site_moments
from common.survival import (
    LogRankResult,
    SurvivalTable,
    kaplan_meier,
    logrank_test,
    merge_survival_tables,
    released_data,
    site_survival_table,
)

DEFAULT_MIN_COHORT = 5  # the default site policy's min_cohort


def federated_kmeans(X: dict[str, np.ndarray], k: int, init: np.ndarray, max_iter: int = 300, tol: float = 1e-4,
                     *, min_cohort: int = DEFAULT_MIN_COHORT, min_cell: int = 1
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Federated Lloyd k-means from ``init``; returns the centres and each site's labels (kept per site).

    Equal to ``sklearn.cluster.KMeans(k, init=init, n_init=1, algorithm="lloyd", max_iter, tol)`` on the
    pooled rows. ``min_cell > 1`` withholds per-site clusters smaller than that (no longer exact).
    """
    if not X:
        raise ProtocolError("(none)", "no site data given")
    arrays = {s: check_matrix(s, X[s]) for s in sorted(X)}
    d = next(iter(arrays.values())).shape[1]
    for site, arr in arrays.items():
        if arr.shape[1] != d:
            raise ProtocolError(site, f"{arr.shape[1]} feature(s), other sites {d}", "use the same feature columns")
    moments = merge_moments({s: site_moments(s, a, min_cohort) for s, a in arrays.items()})
    loop = LloydLoop(centres=check_centres(init, k, d), tol=kmeans_tolerance(moments, tol), max_iter=max_iter)
    while True:
        req = loop.request()
        replies = {s: site_cluster_sums(s, a, req["centres"], req.get("previous"), min_cell, min_cohort)  # type: ignore[arg-type]
                   for s, a in arrays.items()}
        if loop.update(replies):
            break
    return loop.centres, {s: assign_labels(a, loop.centres) for s, a in arrays.items()}


def federated_kmeans_init(X: dict[str, np.ndarray], k: int, seed: int = 0, local_centres: int = 4,
                          min_cell: int = 1, *, min_cohort: int = DEFAULT_MIN_COHORT) -> np.ndarray:
    """Federated k-means++: weighted k-means++ over the sites' local centroids (each >= ``min_cell`` patients)."""
    replies = {s: site_local_centres(s, X[s], local_centres, min_cell, seed, min_cohort) for s in sorted(X)}
    return kmeans_plusplus_from_summaries(replies, k, seed)


def _survival_tables(durations: Mapping[str, pd.Series], events: Mapping[str, pd.Series],
                     groups: Mapping[str, pd.Series] | None, min_cohort: int, time_bin_days: float | None,
                     suppress: bool) -> SurvivalTable:
    _same_sites(durations, events, groups)
    min_cell = min_cohort if suppress else 1
    replies = {s: site_survival_table(s, durations[s], events[s], None if groups is None else groups[s],
                                      min_cohort=min_cohort, time_bin_days=time_bin_days, min_cell=min_cell)
               for s in sorted(durations)}
    return merge_survival_tables(replies)


def federated_kaplan_meier(durations: dict[str, pd.Series], events: dict[str, pd.Series], *,
                           min_cohort: int = DEFAULT_MIN_COHORT, time_bin_days: float | None = None,
                           suppress: bool = False, with_ci: bool = False, alpha: float = 0.05) -> pd.DataFrame:
    """Pooled Kaplan-Meier from the sites' event tables: lifelines' ``survival_function_`` as column ``survival``.

    ``with_ci`` adds ``ci_lower``/``ci_upper`` (lifelines' exponential Greenwood) and ``at_risk``.
    """
    table = _survival_tables(durations, events, None, min_cohort, time_bin_days, suppress)
    km = kaplan_meier(table, alpha=alpha)
    return km[["survival", "ci_lower", "ci_upper", "at_risk"]] if with_ci else km[["survival"]]


def federated_logrank(durations: dict[str, pd.Series], events: dict[str, pd.Series], groups: dict[str, pd.Series],
                      *, min_cohort: int = DEFAULT_MIN_COHORT, time_bin_days: float | None = None,
                      suppress: bool = False) -> LogRankResult:
    """The log-rank test of two or more groups (lifelines' ``multivariate_logrank_test``) over the sites."""
    table = _survival_tables(durations, events, groups, min_cohort, time_bin_days, suppress)
    if table.events.sum() == 0:
        raise ProtocolError("(pooled)", f"no event at any of the sites {sorted(durations)}",
                            "the log-rank test needs events; check os_event")
    return logrank_test(table)


def federated_cox(frames: dict[str, pd.DataFrame], duration_col: str, event_col: str, *,
                  min_cohort: int = DEFAULT_MIN_COHORT, time_bin_days: float | None = None, suppress: bool = False,
                  full: bool = False) -> pd.Series | CoxResult:
    """Cox proportional hazards (Efron's ties) by federated Newton-Raphson: lifelines' ``CoxPHFitter().params_``.

    Every column other than ``duration_col``/``event_col`` is a covariate. ``full`` returns the
    :class:`common.cox.CoxResult` (standard errors, log-likelihood, iterations) instead of the Series.
    """
    if not frames:
        raise ProtocolError("(none)", "no site data given")
    min_cell = min_cohort if suppress else 1
    names: tuple[str, ...] | None = None
    data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for site in sorted(frames):
        frame = frames[site]
        for col in (duration_col, event_col):
            if col not in frame.columns:
                raise ProtocolError(site, f"no column {col!r}", f"name the duration and event columns ({list(frame)})")
        cov = frame.drop(columns=[duration_col, event_col])
        non_numeric = [c for c in cov.columns if not pd.api.types.is_numeric_dtype(cov[c])]
        if non_numeric:
            raise ProtocolError(site, f"covariate(s) {non_numeric} are not numeric", "encode them as numbers")
        if names is None:
            names, first = tuple(str(c) for c in cov.columns), site
        elif tuple(str(c) for c in cov.columns) != names:
            raise ProtocolError(site,
                                f"covariates {list(cov.columns)} differ from those of site {first!r} ({list(names)})",
                                "use the same covariate columns, in the same order, at every site")
        rel = released_data(site, frame[duration_col], frame[event_col], min_cohort=min_cohort,
                            time_bin_days=time_bin_days, min_cell=min_cell)
        x = check_matrix(site, cov.to_numpy(dtype=np.float64), "covariate matrix")[rel.keep]
        data[site] = (x, rel.times, rel.events)
    names = names or ()
    moments = merge_moments({s: site_moments(s, x, 1) for s, (x, _, _) in data.items()})
    scale = moments.std(ddof=1)
    flat = [n for n, sd in zip(names, scale, strict=True) if not sd > 0]
    if flat:
        raise ProtocolError("(pooled)", f"covariate(s) {flat} are constant over the sites {sorted(data)}",
                            "drop them from the model")
    check_separation({s: site_cox_summary(s, x, e) for s, (x, _, e) in data.items()}, names)
    tau = np.unique(np.concatenate([site_event_times(t, e) for _, t, e in data.values()]))
    if tau.size == 0:
        raise ProtocolError("(pooled)", f"no event at any of the sites {sorted(data)}", "Cox needs events")
    min_events = min_cell if min_cell > 1 else 1

    def evaluate(beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        replies = {s: site_cox_sums(s, x, t, e, beta, moments.mean, scale, tau, min_events)
                   for s, (x, t, e) in data.items()}
        return efron_derivatives(merge_cox_sums(replies, tau.size, len(names)), beta)  # type: ignore[arg-type]

    result = cox_result(names, newton_raphson(evaluate, len(names)), scale)
    if full:
        return result
    return pd.Series(result.params, index=pd.Index(list(names), name="covariate"), name="coef")


def _same_sites(durations: Mapping, events: Mapping, groups: Mapping | None) -> None:
    if not durations:
        raise ProtocolError("(none)", "no site data given")
    for other, what in ((events, "events"), (groups, "groups")):
        if other is not None and set(other) != set(durations):
            odd = sorted(set(other) ^ set(durations))
            raise ProtocolError(odd[0], f"has durations or {what} but not both", "give every site both")
