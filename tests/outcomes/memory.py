"""In-memory runs of the outcomes drivers, for the oracle tests of the outcomes and the scale tests.

The helpers build :class:`common.outcomes.OutcomesCohort` s from per-site arrays and run the same drivers as
the outcomes phase (:func:`common.outcomes.run_kmeans`, ``run_survival``, ``run_cox``) through
:class:`common.protocol.InMemoryQuery`. Their defaults are the exact protocol, equal to scikit-learn /
lifelines on the pooled data: ``min_cohort`` 5 (the default site policy), no time bins, no small-cell
suppression (``suppress`` merges cells under ``min_cohort``, as a site without ``exact_outcomes`` does).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from common.cox import CoxResult
from common.errors import ProtocolError
from common.outcomes import (
    OUTCOMES_STEPS,
    KMeansOptions,
    OutcomesCohort,
    SurvivalOptions,
    SurvivalResult,
    cohort_from_arrays,
    cohorts_from_frames,
    run_cox,
    run_kmeans,
    run_survival,
)
from common.protocol import InMemoryQuery

DEFAULT_MIN_COHORT = 5  # the default site policy's min_cohort


def memory_query(cohorts: Mapping[str, OutcomesCohort]) -> InMemoryQuery:
    """The outcomes protocols over in-memory cohorts."""
    return InMemoryQuery(cohorts, OUTCOMES_STEPS)


def kmeans_cohorts(X: Mapping[str, np.ndarray], *, min_cohort: int = DEFAULT_MIN_COHORT,
                   min_cell: int = 1) -> dict[str, OutcomesCohort]:
    """One cohort per site's feature matrix."""
    return {s: cohort_from_arrays(s, X[s], min_cohort=min_cohort, min_cell=min_cell) for s in sorted(X)}


def kmeans_from(X: Mapping[str, np.ndarray], k: int, init: np.ndarray, max_iter: int = 300, tol: float = 1e-4, *,
                min_cohort: int = DEFAULT_MIN_COHORT, min_cell: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`run_kmeans` from ``init`` on the features' own units; the centres and each site's labels."""
    cohorts = kmeans_cohorts(X, min_cohort=min_cohort, min_cell=min_cell)
    options = KMeansOptions(k=k, standardise=False, init="given", initial_centres=init, max_iter=max_iter, tol=tol)
    result = run_kmeans(memory_query(cohorts), options)
    return result.centres, {s: c.labels for s, c in cohorts.items()}  # type: ignore[misc]


def kmeanspp_centres(X: Mapping[str, np.ndarray], k: int, seed: int = 0, local_centres: int = 4, min_cell: int = 1,
                     *, min_cohort: int = DEFAULT_MIN_COHORT) -> np.ndarray:
    """The federated k-means++ start of :func:`run_kmeans` (features in their own units)."""
    options = KMeansOptions(k=k, standardise=False, init="kmeans++", local_centres=local_centres, seed=seed)
    return run_kmeans(memory_query(kmeans_cohorts(X, min_cohort=min_cohort, min_cell=min_cell)),
                      options).initial_centres


def survival_from(durations: Mapping[str, object], events: Mapping[str, object],
                  groups: Mapping[str, object] | None = None, *, min_cohort: int = DEFAULT_MIN_COHORT,
                  time_bin_days: float | None = None, suppress: bool = False, alpha: float = 0.05) -> SurvivalResult:
    """:func:`run_survival` over one cohort per site (durations, events and, optionally, groups)."""
    for other, what in ((events, "events"), (groups, "groups")):
        if other is not None and set(other) != set(durations):
            odd = sorted(set(other) ^ set(durations))
            raise ProtocolError(odd[0], f"has durations or {what} but not both", "give every site both")
    min_cell = min_cohort if suppress else 1
    cohorts = {s: cohort_from_arrays(s, durations=durations[s], events=events[s],
                                     groups=None if groups is None else groups[s], min_cohort=min_cohort,
                                     min_cell=min_cell) for s in sorted(durations)}
    return run_survival(memory_query(cohorts), SurvivalOptions(time_bin_days=time_bin_days, alpha=alpha))


def cox_from(frames: Mapping[str, pd.DataFrame], duration_col: str, event_col: str, *,
             min_cohort: int = DEFAULT_MIN_COHORT, time_bin_days: float | None = None,
             suppress: bool = False, penalizer: float | tuple[float, ...] = 0.0, l1_ratio: float = 0.0) -> CoxResult:
    """:func:`run_cox` on each site's frame: every column but the duration and the event is a covariate."""
    cohorts = cohorts_from_frames(frames, duration_col, event_col, min_cohort=min_cohort,
                                  min_cell=min_cohort if suppress else 1)
    return run_cox(memory_query(cohorts), SurvivalOptions(time_bin_days=time_bin_days), penalizer=penalizer,
                   l1_ratio=l1_ratio)
