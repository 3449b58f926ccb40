"""Federated Kaplan-Meier and log-rank equal lifelines on the pooled data; the binned/suppressed mode; bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test

from common.errors import PolicyError, ProtocolError
from common.survival import kaplan_meier, logrank_test, merge_survival_tables, released_data, site_survival_table
from tests.outcomes.memory import survival_from


def _cohort(n_sites: int, seed: int, n_groups: int = 2) -> tuple[dict, dict, dict]:
    """Uneven sites (5 to 70 patients), integer days (many ties), ~35% censored, hazard by group."""
    rng = np.random.default_rng(seed)
    durations, events, groups = {}, {}, {}
    for i in range(n_sites):
        n = int(rng.integers(5, 70))
        g = rng.integers(0, n_groups, size=n)
        t_event = rng.exponential(300.0 / (1.0 + 0.6 * g))
        t_cens = rng.uniform(50, 900, size=n)
        site = f"site-{i:02d}"
        durations[site] = pd.Series(np.maximum(1, np.round(np.minimum(t_event, t_cens))))
        events[site] = pd.Series((t_event <= t_cens).astype(int))
        groups[site] = pd.Series(g)
    return durations, events, groups


def _pool(parts: dict) -> pd.Series:
    return pd.concat([parts[s] for s in sorted(parts)], ignore_index=True)


@pytest.mark.parametrize(("n_sites", "seed"), [(2, 0), (4, 1), (8, 2)])
def test_kaplan_meier_equals_lifelines(n_sites: int, seed: int) -> None:
    durations, events, _ = _cohort(n_sites, seed)
    km = survival_from(durations, events).pooled()
    ref = KaplanMeierFitter().fit(_pool(durations), _pool(events))
    assert list(km.columns) == ["survival", "ci_lower", "ci_upper", "at_risk", "observed", "censored"]
    assert km.index.name == "timeline"
    assert np.array_equal(km.index.to_numpy(), ref.survival_function_.index.to_numpy())
    assert np.abs(km["survival"].to_numpy() - ref.survival_function_.iloc[:, 0].to_numpy()).max() < 1e-12
    assert np.abs(km[["ci_lower", "ci_upper"]].to_numpy() - ref.confidence_interval_.to_numpy()).max() < 1e-12
    assert np.array_equal(km["at_risk"].to_numpy(), ref.event_table["at_risk"].to_numpy())


def test_kaplan_meier_per_group_and_alpha_equal_lifelines() -> None:
    durations, events, groups = _cohort(3, 9, n_groups=3)
    curves = survival_from(durations, events, groups, min_cohort=1, alpha=0.1).curves
    T, E, G = _pool(durations), _pool(events), _pool(groups)
    assert sorted(curves) == [0, 1, 2]
    for g in (0, 1, 2):
        km = curves[g]
        ref = KaplanMeierFitter(alpha=0.1).fit(T[G == g], E[G == g])
        assert np.abs(km["survival"].to_numpy() - ref.survival_function_.iloc[:, 0].to_numpy()).max() < 1e-12
        assert np.abs(km[["ci_lower", "ci_upper"]].to_numpy() - ref.confidence_interval_.to_numpy()).max() < 1e-12


@pytest.mark.parametrize(("n_sites", "n_groups", "seed"), [(2, 2, 3), (5, 2, 4), (8, 3, 5), (6, 4, 6)])
def test_logrank_equals_lifelines(n_sites: int, n_groups: int, seed: int) -> None:
    durations, events, groups = _cohort(n_sites, seed, n_groups)
    test = survival_from(durations, events, groups).logrank
    ref = multivariate_logrank_test(_pool(durations), _pool(groups), _pool(events))
    assert abs(test.test_statistic - ref.test_statistic) < 1e-8
    assert abs(test.p_value - ref.p_value) < 1e-10
    assert test.degrees_of_freedom == n_groups - 1


def test_logrank_with_a_group_without_events_still_equals_lifelines() -> None:
    durations, events, groups = _cohort(3, 8)
    events = {s: events[s].where(groups[s] == 0, 0) for s in events}
    test = survival_from(durations, events, groups).logrank
    ref = multivariate_logrank_test(_pool(durations), _pool(groups), _pool(events))
    assert abs(test.test_statistic - ref.test_statistic) < 1e-8 and test.observed[1] == 0


def test_binned_suppressed_mode_changes_times_not_counts() -> None:
    """Binned + suppressed: the replies hold bin edges shared by >= min_cohort patients, never a patient's time."""
    durations, events, groups = _cohort(4, 12)
    durations = {s: d + 0.5 for s, d in durations.items()}  # no raw time is a multiple of the bin
    raw_times = set(np.concatenate([d.to_numpy() for d in durations.values()]).tolist())
    m, width = 5, 7.0
    replies = {s: site_survival_table(s, durations[s], events[s], groups[s], min_cohort=m, time_bin_days=width,
                                      min_cell=m) for s in durations}
    for site, reply in replies.items():
        times = np.asarray(reply["times"])
        assert reply["mode"] == "binned"
        assert np.allclose(times / width, np.round(times / width))
        assert not raw_times & set(times.tolist())
        removed = np.asarray(reply["removed"])
        assert np.all((removed == 0) | (removed >= m)), site  # every released cell: >= m patients of the group
        for key, value in reply.items():  # no other field carries a raw time either
            if isinstance(value, np.ndarray):
                assert not raw_times & set(value.ravel().tolist()), key
    exact = merge_survival_tables({s: site_survival_table(s, durations[s], events[s], groups[s]) for s in durations})
    binned = merge_survival_tables(replies)
    kept = [g for g in exact.groups if not any(g in r["suppressed_groups"] for r in replies.values())]
    assert kept == list(exact.groups)  # no group is below min_cohort at any site in this cohort
    assert np.array_equal(binned.n, exact.n) and np.array_equal(binned.events, exact.events)  # unchanged
    km_exact, km_binned = kaplan_meier(exact), kaplan_meier(binned)
    assert len(km_binned) < len(km_exact)  # the timeline changes...
    grid = np.arange(0.0, 900.0, 1.0)
    step = {name: km["survival"].to_numpy()[np.searchsorted(km.index.to_numpy(), grid, side="right") - 1]
            for name, km in (("exact", km_exact), ("binned", km_binned))}
    assert 0.0 < np.abs(step["exact"] - step["binned"]).max() < 0.2  # ... and the curve moves, a little
    assert logrank_test(binned).test_statistic != pytest.approx(logrank_test(exact).test_statistic, rel=1e-6)
    # ... and equals lifelines on the pooled *released* data
    rel = {s: released_data(s, durations[s], events[s], groups[s], time_bin_days=width, min_cell=m) for s in durations}
    T = np.concatenate([r.times for r in rel.values()])
    E = np.concatenate([r.events for r in rel.values()])
    G = np.concatenate([r.groups for r in rel.values()])
    ref = KaplanMeierFitter().fit(T, E)
    assert np.abs(km_binned["survival"].to_numpy() - ref.survival_function_.iloc[:, 0].to_numpy()).max() < 1e-12
    assert abs(logrank_test(binned).test_statistic - multivariate_logrank_test(T, G, E).test_statistic) < 1e-8
    via_runner = survival_from(durations, events, groups, time_bin_days=width, suppress=True).logrank
    assert via_runner.test_statistic == pytest.approx(logrank_test(binned).test_statistic, rel=1e-12)


def test_small_groups_are_suppressed_and_small_cells_merged() -> None:
    t = np.array([3.0, 4, 5, 9, 10, 30, 31, 32, 33, 50, 8, 9])
    e = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0])
    g = np.array([0] * 10 + [1] * 2)
    with pytest.raises(ProtocolError, match="site-x.*binned"):
        released_data("site-x", t, e, g, min_cell=4)
    rel = released_data("site-x", t, e, g, min_cell=4, time_bin_days=1.0)  # integer days: bins change nothing
    assert rel.suppressed_groups == [1] and rel.times.size == 10
    # cells of >= 4: {3,4,5,9} at 9, {10,30,31,32} at 32, remainder {33,50} joins the last cell at 32
    assert rel.times.tolist() == [9.0] * 4 + [32.0] * 6
    assert rel.events.sum() == e[:10].sum()


@pytest.mark.parametrize(("durations", "events", "match"), [
    ([10, -3, 5, 8, 9], [1, 0, 1, 1, 0], "negative"),
    ([10, np.nan, 5, 8, 9], [1, 0, 1, 1, 0], "missing"),
    ([10, 3, 5, 8, 9], [1, 2, 1, 1, 0], "0 .censored. or 1"),
    ([10, 3, 5, 8, 9], [1, 0, np.nan, 1, 0], "0 .censored. or 1"),
    ([10, 3, 5, 8, 9], [1, 0, 1], "event flags"),
])
def test_bad_survival_input_names_the_site(durations: list, events: list, match: str) -> None:
    good_d, good_e, _ = _cohort(2, 0)
    d = dict(good_d, **{"site-bad": pd.Series(durations, dtype=float)})
    e = dict(good_e, **{"site-bad": pd.Series(events, dtype=float)})
    with pytest.raises(ProtocolError, match=f"site-bad.*{match}"):
        survival_from(d, e)


def test_site_below_min_cohort_refuses() -> None:
    durations, events, groups = _cohort(2, 0)
    durations["site-tiny"] = pd.Series([5.0, 9.0, 12.0])
    events["site-tiny"] = pd.Series([1, 0, 1])
    groups["site-tiny"] = pd.Series([0, 1, 0])
    with pytest.raises(PolicyError, match="site-tiny.*min_cohort"):
        survival_from(durations, events, groups)
    assert len(survival_from(durations, events, min_cohort=3).pooled()) > 0
