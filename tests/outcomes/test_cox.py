"""Federated Cox (:func:`common.outcomes.run_cox`: Efron ties, Newton-Raphson on risk-set sums) equals lifelines'
CoxPHFitter().params_."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter

from common.cox import site_cox_sums
from common.errors import PolicyError, ProtocolError
from tests.outcomes.memory import cox_from


def _frames(n_sites: int, seed: int) -> dict[str, pd.DataFrame]:
    """Uneven sites; integer days (ties); covariates on different scales, a binary one, a site shift in age."""
    rng = np.random.default_rng(seed)
    frames = {}
    for i in range(n_sites):
        n = int(rng.integers(8, 80))
        age = rng.normal(8 + i, 4, size=n)
        volume = rng.lognormal(1.0, 0.7, size=n)
        subtype = rng.integers(0, 2, size=n)
        risk = 0.05 * age + 0.4 * np.log(volume) + 0.8 * subtype
        t_event = rng.exponential(400 * np.exp(-risk))
        t_cens = rng.uniform(100, 1200, size=n)
        frames[f"site-{i:02d}"] = pd.DataFrame({
            "os_days": np.maximum(1, np.round(np.minimum(t_event, t_cens))),
            "os_event": (t_event <= t_cens).astype(int),
            "age": age, "volume_ml": volume, "subtype": subtype,
        })
    return frames


def _lifelines(frames: dict[str, pd.DataFrame]) -> pd.Series:
    pooled = pd.concat([frames[s] for s in sorted(frames)], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter().fit(pooled, "os_days", "os_event").params_


@pytest.mark.parametrize(("n_sites", "seed"), [(2, 0), (3, 1), (5, 2), (8, 3)])
def test_coefficients_equal_lifelines(n_sites: int, seed: int) -> None:
    frames = _frames(n_sites, seed)
    coef = cox_from(frames, "os_days", "os_event").coefficients()
    ref = _lifelines(frames)
    assert coef.index.equals(ref.index) and coef.index.name == "covariate" and coef.name == "coef"
    assert np.abs(coef.to_numpy() - ref.to_numpy()).max() < 1e-6
    assert abs(coef["subtype"]) > 0.2  # a real effect, not a trivial zero


def test_standard_errors_and_heavy_ties_equal_lifelines() -> None:
    frames = {s: f.assign(os_days=np.ceil(f["os_days"] / 60.0)) for s, f in _frames(4, 5).items()}  # many ties
    res = cox_from(frames, "os_days", "os_event")
    pooled = pd.concat([frames[s] for s in sorted(frames)], ignore_index=True)
    ref = CoxPHFitter().fit(pooled, "os_days", "os_event")
    assert np.abs(res.params - ref.params_.to_numpy()).max() < 1e-6
    assert np.abs(res.se - ref.standard_errors_.to_numpy()).max() < 1e-6
    assert abs(res.loglik - ref.log_likelihood_) < 1e-6


def test_binned_mode_equals_lifelines_on_binned_times() -> None:
    frames = _frames(3, 7)
    coef = cox_from(frames, "os_days", "os_event", time_bin_days=30.0).coefficients()
    binned = {s: f.assign(os_days=np.ceil(f["os_days"] / 30.0) * 30.0) for s, f in frames.items()}
    assert np.abs(coef.to_numpy() - _lifelines(binned).to_numpy()).max() < 1e-6
    assert np.abs(coef.to_numpy() - _lifelines(frames).to_numpy()).max() > 1e-4  # binning changes the estimate


def test_suppressed_mode_refuses_tie_sums_over_few_events() -> None:
    """Tie sums over fewer than min_cohort events would disclose single patients' covariates."""
    with pytest.raises(PolicyError, match="min_cohort.*tie sums"):
        cox_from(_frames(3, 7), "os_days", "os_event", time_bin_days=7.0, suppress=True)
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    reply = site_cox_sums("site-a", x, np.array([5.0, 5, 9, 9]), np.array([1, 1, 1, 0]), np.zeros(1), np.zeros(1),
                          np.ones(1), np.array([5.0, 9.0]))
    assert reply["risk_count"].tolist() == [4.0, 2.0] and reply["death_count"].tolist() == [2.0, 1.0]
    assert reply["x_death"].ravel().tolist() == [3.0, 3.0]  # the lone event at 9 is one patient's covariate
    with pytest.raises(PolicyError, match="site-a"):
        site_cox_sums("site-a", x, np.array([5.0, 5, 9, 9]), np.array([1, 1, 1, 0]), np.zeros(1), np.zeros(1),
                      np.ones(1), np.array([5.0, 9.0]), min_events_per_time=2)


def test_bad_inputs_name_the_site() -> None:
    frames = _frames(3, 0)
    neg = dict(frames, **{"site-01": frames["site-01"].assign(os_days=lambda f: f["os_days"] - 10_000)})
    with pytest.raises(ProtocolError, match="site-01.*negative"):
        cox_from(neg, "os_days", "os_event")
    odd = dict(frames, **{"site-02": frames["site-02"].assign(os_event=2)})
    with pytest.raises(ProtocolError, match="site-02.*0 .censored. or 1"):
        cox_from(odd, "os_days", "os_event")
    renamed = dict(frames, **{"site-00": frames["site-00"].rename(columns={"age": "age_years"})})
    with pytest.raises(ProtocolError, match="site-01.*covariates.*site-00"):
        cox_from(renamed, "os_days", "os_event")
    tiny = dict(frames, **{"site-09": frames["site-00"].iloc[:4]})
    with pytest.raises(PolicyError, match="site-09.*min_cohort"):
        cox_from(tiny, "os_days", "os_event")


def test_group_without_events_is_refused_naming_its_sites() -> None:
    """lifelines returns a huge coefficient with a warning; the federated fit refuses and names the sites."""
    frames = {s: f.assign(os_event=np.where(f["subtype"] == 1, 0, f["os_event"])) for s, f in _frames(3, 4).items()}
    with pytest.raises(ProtocolError, match=r"site-00, site-01, site-02.*subtype = 1 has no events"):
        cox_from(frames, "os_days", "os_event")
    with pytest.raises(ProtocolError, match="constant"):
        cox_from({s: f.assign(subtype=1) for s, f in _frames(2, 4).items()}, "os_days", "os_event")
