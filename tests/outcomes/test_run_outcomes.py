"""The outcomes phase's driver (:func:`common.outcomes.run_outcomes`) over in-memory sites equals the pooled
computation: scikit-learn's k-means from the same start, then lifelines' Kaplan-Meier, log-rank and Cox per cluster.

Without Flower; ``test_flower_outcomes.py`` runs the same driver through the ServerApp.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test
from sklearn.cluster import KMeans

from common.config import OutcomesConfig
from common.outcomes import OutcomesCohort, cohort_from_arrays, run_outcomes
from common.survival import released_data
from tests.outcomes.memory import memory_query

WIDTH = 14.0


def _cohorts(seed: int, exact: tuple[bool, ...]) -> dict[str, OutcomesCohort]:
    """Two tumour types in different proportions per site; the second type dies faster."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, allows_exact in enumerate(exact):
        n = int(rng.integers(15, 40))
        kind = (rng.random(n) < 0.3 + 0.15 * i).astype(int)
        x = np.c_[rng.normal(2.0 * kind, 0.7), rng.normal(50 + 30 * kind, 8.0)]
        t_event = rng.exponential(500.0 / (1 + 2 * kind))
        t_cens = rng.uniform(100, 900, size=n)
        site = f"site-{i:02d}"
        out[site] = cohort_from_arrays(site, x, np.maximum(1, np.round(np.minimum(t_event, t_cens))),
                                       (t_event <= t_cens).astype(int), feature_names=("volume", "intensity"),
                                       min_cohort=5, min_cell=1 if allows_exact else 5, exact=allows_exact)
    return out


@pytest.mark.parametrize("exact", [(True, True, True), (True, False, True, True)])
def test_run_outcomes_equals_sklearn_and_lifelines(exact: tuple[bool, ...]) -> None:
    cohorts = _cohorts(len(exact), exact)
    cfg = OutcomesConfig(k=2, seed=1, time_bin_days=WIDTH)
    result = run_outcomes(memory_query(cohorts), cfg)
    km = result.kmeans
    sites = sorted(cohorts)
    assert km.sites == sites and km.converged and result.mode == ("exact" if all(exact) else "binned")

    # k-means: scikit-learn on the pooled standardised rows, from the federated k-means++ start
    z = np.concatenate([(cohorts[s].features - km.space.shift) / km.space.scale for s in sites])  # type: ignore[operator]
    ref = KMeans(n_clusters=2, init=km.initial_centres, n_init=1, algorithm="lloyd", tol=cfg.tol).fit(z)
    assert np.abs(km.centres - ref.cluster_centers_).max() < 1e-8
    labels = np.concatenate([cohorts[s].labels for s in sites])  # type: ignore[misc]
    assert np.array_equal(labels, ref.labels_)
    assert km.cases == {s: len(cohorts[s].features) for s in sites}  # type: ignore[arg-type]

    # survival and Cox: lifelines on the pooled data as the sites released it
    parts = [released_data(s, c.durations, c.events, c.labels, time_bin_days=None if all(exact) else WIDTH,
                           min_cell=c.min_cell) for s, c in cohorts.items()]
    T, E, G = (np.concatenate(column) for column in zip(*[(r.times, r.events, r.groups) for r in parts], strict=True))
    assert result.survival.cases == {s: r.times.size for s, r in zip(cohorts, parts, strict=True)}
    for g in (0, 1):
        curve = result.survival.curves[g]
        lifelines_km = KaplanMeierFitter().fit(T[G == g], E[G == g])
        assert np.array_equal(curve.index.to_numpy(), lifelines_km.survival_function_.index.to_numpy())
        assert np.abs(curve["survival"].to_numpy() - lifelines_km.survival_function_.iloc[:, 0].to_numpy()).max() \
            < 1e-12
    assert result.survival.logrank is not None
    assert abs(result.survival.logrank.test_statistic - multivariate_logrank_test(T, G, E).test_statistic) < 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cph = CoxPHFitter().fit(pd.DataFrame({"T": T, "E": E, "cluster_1": (G == 1).astype(float)}), "T", "E")
    assert result.cox is not None and result.cox_error is None and result.reference == 0
    assert result.cox.names == ("cluster_1",)
    assert abs(result.cox.params[0] - cph.params_["cluster_1"]) < 1e-6
    assert abs(result.cox.se[0] - cph.standard_errors_["cluster_1"]) < 1e-6
    assert abs(result.cox.params[0]) > 0.3  # the faster-dying type is one cluster


def test_cox_is_reported_not_estimable_for_a_cluster_without_events() -> None:
    cohorts = _cohorts(3, (True, True, True))
    result = run_outcomes(memory_query(cohorts), OutcomesConfig(k=2, seed=1, init="given",
                                                                 initial_centres=((-1.0, -1.0), (1.0, 1.0))))
    group_1 = {s: c.labels == 1 for s, c in cohorts.items()}  # type: ignore[misc]
    for s, c in cohorts.items():
        c.events = np.where(group_1[s], 0, c.events)  # type: ignore[arg-type]
    again = run_outcomes(memory_query(cohorts), OutcomesConfig(k=2, seed=1, init="given",
                                                                initial_centres=((-1.0, -1.0), (1.0, 1.0))))
    assert result.cox is not None and again.cox is None
    assert again.cox_error == "cluster(s) [1] have no events; their hazard ratio is not estimable"
    assert again.survival.logrank is not None and again.survival.logrank.observed[1] == 0
