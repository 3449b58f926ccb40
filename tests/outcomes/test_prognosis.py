"""Federated prognosis (:mod:`common.prognosis`) against the pooled oracles: lifelines' ``CoxPHFitter`` with its
elastic net, lifelines' ``concordance_index`` and scikit-survival's ``cumulative_dynamic_auc``, on lifelines'
bundled real datasets split unevenly across sites; and the site's guards (Newton sums, one risk table)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_gbsg2, load_rossi
from lifelines.utils import concordance_index
from sksurv.metrics import brier_score, concordance_index_ipcw, cumulative_dynamic_auc
from sksurv.util import Surv

from common.errors import PolicyError, ProtocolError
from common.outcomes import SurvivalOptions
from common.prognosis import PrognosisOptions, run_prognosis
from common.prognosis_site import (
    PROGNOSIS_MOMENTS,
    PROGNOSIS_RISK,
    PROGNOSIS_STEPS,
    PROGNOSIS_SUMS,
    prognosis_sites_from_frames,
)
from common.protocol import InMemoryQuery
from common.release_ledger import ReleaseLedger
from common.survival import released_data

HORIZONS = (365.0, 730.0, 1460.0)
DEFAULT_STUDY_DIR = Path(__file__).resolve().parents[2] / "common" / "studies"


def _uneven(frame: pd.DataFrame, sites: int, seed: int, test: float | None = None) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    owner = rng.choice(sites, size=len(frame), p=rng.dirichlet(np.full(sites, 1.5)))
    if test is not None:
        frame = frame.assign(split=np.where(rng.random(len(frame)) < test, "test", "train"))
    return {f"site-{k}": frame[owner == k].reset_index(drop=True) for k in range(sites) if (owner == k).sum() >= 5}


def gbsg2_full_one_hot() -> pd.DataFrame:
    """GBSG2 with every level of its three categorical columns as an indicator: collinear (each set sums to 1)."""
    return pd.get_dummies(load_gbsg2(), columns=["horTh", "menostat", "tgrade"], dtype=float)


def _pooled(frames: dict[str, pd.DataFrame], split: str | None = None) -> pd.DataFrame:
    pooled = pd.concat([frames[s] for s in sorted(frames)], ignore_index=True)
    if split is None:
        return pooled
    return pooled[pooled["split"] == split].drop(columns="split").reset_index(drop=True)


def _lifelines(data: pd.DataFrame, duration: str, event: str, penalizer: object, l1_ratio: float) -> CoxPHFitter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter(penalizer=penalizer, l1_ratio=l1_ratio).fit(data, duration, event)


def _run(frames: dict[str, pd.DataFrame], duration: str, event: str, **options: object) -> object:
    split = "split" if "split" in next(iter(frames.values())).columns else None
    sites = prognosis_sites_from_frames(frames, duration, event, split_column=split)
    return run_prognosis(InMemoryQuery(sites, PROGNOSIS_STEPS), PrognosisOptions(split=split is not None, **options))


PER_COVARIATE = (0.0, 0.0, 0.2, 0.1, 0.0, 0.0, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1)  # GBSG2's 12 columns, one each


@pytest.mark.parametrize(("penalizer", "l1_ratio"), [(0.1, 0.0), (0.05, 0.5), (0.02, 0.9), (PER_COVARIATE, 0.3)])
def test_gbsg2_collinear_one_hot_equals_lifelines(penalizer: object, l1_ratio: float) -> None:
    frames = _uneven(gbsg2_full_one_hot(), 6, seed=0)
    res = _run(frames, "time", "cens", penalizer=penalizer, l1_ratio=l1_ratio)
    pen = np.asarray(penalizer) if isinstance(penalizer, tuple) else penalizer
    ref = _lifelines(_pooled(frames), "time", "cens", pen, l1_ratio)
    assert list(res.cox.names) == list(ref.params_.index)
    assert np.abs(res.cox.params - ref.params_.to_numpy()).max() < 1e-6
    assert np.abs(res.cox.se - ref.standard_errors_.to_numpy()).max() < 1e-6
    summary = ref.summary
    p = np.array([res.cox.summary()[n]["p"] for n in res.cox.names])
    assert np.abs(p - summary["p"].to_numpy()).max() < 1e-6
    assert res.rounds == res.cox.n_iter + 1 + 1  # moments, one round per Newton step, one risk table
    assert abs(res.cox.params[list(res.cox.names).index("pnodes")]) > 0.02  # a real effect survives the penalty


def test_collinear_one_hot_without_penalizer_is_refused_with_the_fix() -> None:
    frames = _uneven(gbsg2_full_one_hot(), 6, seed=0)
    with pytest.raises(ProtocolError, match="penalizer"):
        _run(frames, "time", "cens")


@pytest.mark.parametrize(("penalizer", "l1_ratio"), [(0.0, 0.0), (0.01, 0.9), (0.2, 0.2)])
def test_rossi_equals_lifelines(penalizer: float, l1_ratio: float) -> None:
    frames = _uneven(load_rossi(), 5, seed=1)
    res = _run(frames, "week", "arrest", penalizer=penalizer, l1_ratio=l1_ratio)
    ref = _lifelines(_pooled(frames), "week", "arrest", penalizer, l1_ratio)
    assert np.abs(res.cox.params - ref.params_.to_numpy()).max() < 1e-6
    assert np.abs(res.cox.se - ref.standard_errors_.to_numpy()).max() < 1e-6


def test_c_index_and_dynamic_auc_equal_lifelines_and_sksurv_to_the_bin_bound() -> None:
    frames = _uneven(gbsg2_full_one_hot(), 6, seed=2, test=0.3)
    res = _run(frames, "time", "cens", penalizer=0.1, l1_ratio=0.2, risk_bins=256, horizons=HORIZONS)
    train, test = _pooled(frames, "train"), _pooled(frames, "test")
    ref = _lifelines(train, "time", "cens", 0.1, 0.2)
    assert np.abs(res.cox.params - ref.params_.to_numpy()).max() < 1e-6
    y_train = Surv.from_arrays(train["cens"].astype(bool), train["time"])
    for name, data in (("train", train), ("test", test)):
        lp = ref.predict_log_partial_hazard(data).to_numpy()
        c = concordance_index(data["time"], -lp, data["cens"])
        fed = res.c_index[name]
        assert 0 < fed.bound < 0.01  # 256 bins: the bins' resolution, stated
        assert abs(fed.value - c) <= fed.bound
        assert abs(fed.value - (1 - c)) > 0.2  # a reversed score would miss it by far
        auc, _ = cumulative_dynamic_auc(y_train, Surv.from_arrays(data["cens"].astype(bool), data["time"]), lp,
                                        list(HORIZONS))
        for h, a in zip(HORIZONS, auc, strict=True):
            b = res.auc[name][h]
            assert 0 < b.bound < 0.01 and abs(b.value - a) <= b.bound, (name, h, a, b)
        y = Surv.from_arrays(data["cens"].astype(bool), data["time"])
        uno = concordance_index_ipcw(y_train, y, lp)[0]
        assert 0 < res.uno[name].bound < 0.01 and abs(res.uno[name].value - uno) <= res.uno[name].bound
        survival = ref.predict_survival_function(data, times=list(HORIZONS)).T.to_numpy()
        _, brier = brier_score(y_train, y, survival, list(HORIZONS))
        for h, b in zip(HORIZONS, brier, strict=True):
            fed_b = res.brier[name][h]
            assert 0 < fed_b.bound < 0.03 and abs(fed_b.value - b) <= fed_b.bound, (name, h, b, fed_b)
        groups = res.calibration[name]
        assert len(groups) == 5 and sum(g["n"] for g in groups) == len(data)
        assert groups[0]["observed"] > groups[-1]["observed"]  # the lowest-risk group survives longest
        for site in sorted(frames):  # each site's own C-index, from its own rows
            rows = frames[site][frames[site]["split"] == name].drop(columns="split")
            lp_site = ref.predict_log_partial_hazard(rows).to_numpy()
            mine = res.c_index_sites[name][site]
            if rows["cens"].sum() and len(rows) > 1:
                assert abs(mine.value - concordance_index(rows["time"], -lp_site, rows["cens"])) <= mine.bound + 1e-12


def test_binned_c_index_equals_lifelines_on_the_released_times() -> None:
    """Sites without exact outcomes: times binned (13 weeks) and merged to cells of >= 5 patients, score segments
    of >= 5 patients on fixed blocks of the bins; the C-index is lifelines' on the released times, to the much
    wider bound those cells allow (what k-anonymous tables cost: measured 0.29 here)."""
    frames = _uneven(load_rossi(), 3, seed=3)
    sites = prognosis_sites_from_frames(frames, "week", "arrest", min_cell=5, min_cohort=5)
    beta = np.array([-0.4, -0.3, 0.1, -0.2, -0.4, -0.1, 0.3])
    pooled = _pooled(frames)
    x = pooled.drop(columns=["week", "arrest"])
    mean, scale = x.mean().to_numpy(), x.std().to_numpy()
    edges = np.linspace(-1.5, 1.5, 31)
    query = InMemoryQuery(sites, PROGNOSIS_STEPS)
    replies = query(PROGNOSIS_RISK, {**SurvivalOptions(time_bin_days=13).request(), "split": "all", "beta": beta,
                                     "mean": mean, "scale": scale, "edges": edges})
    from common.prognosis import concordance, merge_risk_tables

    table = merge_risk_tables(replies, edges.size + 1)
    cells = table.rows[:, 3] + table.rows[:, 4]
    assert cells.min() >= 5  # no released cell under the site's min_cell
    released_t, released_e, lp = [], [], []
    for site in sorted(frames):
        f = frames[site]
        rel = released_data(site, f["week"], f["arrest"], min_cohort=5, time_bin_days=13, min_cell=5)
        released_t.append(rel.times)
        released_e.append(rel.events)
        lp.append(((f.drop(columns=["week", "arrest"]).to_numpy() - mean) / scale)[rel.keep] @ beta)
    c = concordance_index(np.concatenate(released_t), -np.concatenate(lp), np.concatenate(released_e))
    fed = concordance(table)
    assert abs(fed.value - c) <= fed.bound < 0.35
    width = -(-(edges.size + 1) // 8)  # segments start and end on the fixed blocks, never at a patient's bin
    assert np.all(table.rows[:, 1] % width == 0)
    assert np.all(((table.rows[:, 2] + 1) % width == 0) | (table.rows[:, 2] == edges.size))
    assert all(np.all(np.asarray(r["within"]) == 0) and not r["within_exact"] for r in replies.values())


# ============================================================================================ the site's guards


def _age_site(frames: dict[str, pd.DataFrame], newton: bool) -> tuple[object, np.ndarray, np.ndarray, np.ndarray]:
    sites = prognosis_sites_from_frames(frames, "week", "arrest")
    site = sites["site-0"]
    site.newton_allowed = newton
    pooled = _pooled(frames).drop(columns=["week", "arrest"])
    return site, pooled.mean().to_numpy(), pooled.std().to_numpy(), frames["site-0"]["age"].to_numpy()


def test_a_large_beta_reads_the_oldest_patients_age_unless_the_site_allows_newton_sums() -> None:
    """The attack the ``cox_newton`` policy answers: beta = 60 on age (normalised) makes the risk-set sums a
    soft maximum, and s1 / s0 over the whole first risk set is the oldest patient's age."""
    frames = _uneven(load_rossi(), 5, seed=1)
    weeks = frames["site-0"]["week"].to_numpy(dtype=np.float64)
    events = frames["site-0"]["arrest"].to_numpy()
    times = np.unique(weeks[events == 1])
    for newton in (True, False):
        site, mean, scale, age = _age_site(frames, newton)
        j = list(frames["site-0"].drop(columns=["week", "arrest"]).columns).index("age")
        beta = np.zeros(mean.size)
        beta[j] = 60.0
        request = {"mode": "exact", "split": "all", "beta": beta, "mean": mean, "scale": scale,
                   "event_times": times}
        if newton:  # unguarded: the reply holds one patient's value
            reply = PROGNOSIS_STEPS[PROGNOSIS_SUMS](site, request)
            recovered = reply["s1"][0][j] / reply["s0"][0] * scale[j] + mean[j]
            oldest_at_risk = age[weeks >= times[0]].max()
            assert abs(recovered - oldest_at_risk) < 0.05  # one patient's age, to 0.05 years
        else:
            with pytest.raises(PolicyError, match="cox_newton"):
                PROGNOSIS_STEPS[PROGNOSIS_SUMS](site, request)
            # the moments round still answers (aggregates over the cohort only)
            assert PROGNOSIS_STEPS[PROGNOSIS_MOMENTS](site, {"mode": "exact", "split": "all"})["n"] == age.size


def test_a_second_risk_table_is_refused_by_the_ledger() -> None:
    """Two risk tables of one split with other edges would difference their cells; the site releases one per
    split and study (the very same request again is a rerun)."""
    frames = _uneven(load_rossi(), 3, seed=3)
    sites = prognosis_sites_from_frames(frames, "week", "arrest", min_cell=5, min_cohort=5)
    site = sites["site-0"]
    site.ledger = ReleaseLedger("site-0", None, 5)
    site.study_key = "study-a"
    site.cohorts["all"].survival_ids = tuple(f"p{i}" for i in range(len(frames["site-0"])))
    pooled = _pooled(frames).drop(columns=["week", "arrest"])
    base = {**SurvivalOptions(time_bin_days=13).request(), "split": "all", "beta": np.full(7, 0.2),
            "mean": pooled.mean().to_numpy(), "scale": pooled.std().to_numpy(), "edges": np.linspace(-2, 2, 17)}
    first = PROGNOSIS_STEPS[PROGNOSIS_RISK](site, base)
    again = PROGNOSIS_STEPS[PROGNOSIS_RISK](site, dict(base))
    assert np.array_equal(first["rows"], again["rows"])
    with pytest.raises(PolicyError, match="release_ledger"):
        PROGNOSIS_STEPS[PROGNOSIS_RISK](site, {**base, "edges": np.linspace(-2, 2, 17) + 0.01})
    site.study_key = "study-b"  # nor in another study: one table per set of patients over the site's lifetime
    with pytest.raises(PolicyError, match="release_ledger"):
        PROGNOSIS_STEPS[PROGNOSIS_RISK](site, {**base, "edges": np.linspace(-1, 1, 9)})
    with pytest.raises(ProtocolError, match="out of range"):  # a threshold-like beta is not a model
        PROGNOSIS_STEPS[PROGNOSIS_RISK](site, {**base, "beta": np.full(7, 1e300)})
    with pytest.raises(PolicyError, match="histogram_bins"):
        site.max_bins = 8
        PROGNOSIS_STEPS[PROGNOSIS_RISK](site, {**base, "split": "all", "edges": np.linspace(-2, 2, 17)})


def test_a_rare_indicator_level_is_refused_in_the_moments_round() -> None:
    """One patient with level B of an indicator: its crossproducts would be that patient's covariates, its event
    sum the patient's flag. A site flooring cells (min_cell 5) refuses; an exact-outcomes site answers."""
    frames = _uneven(load_rossi(), 3, seed=3)
    frames["site-0"] = frames["site-0"].assign(scanner_b=(np.arange(len(frames["site-0"])) == 3).astype(float))
    for f in ("site-1", "site-2"):
        frames[f] = frames[f].assign(scanner_b=0.0)
    floored = prognosis_sites_from_frames(frames, "week", "arrest", min_cell=5, min_cohort=5)["site-0"]
    request = {**SurvivalOptions(time_bin_days=13).request(), "split": "all"}
    with pytest.raises(PolicyError, match="min_cell"):
        PROGNOSIS_STEPS[PROGNOSIS_MOMENTS](floored, request)
    exact = prognosis_sites_from_frames(frames, "week", "arrest")["site-0"]
    assert PROGNOSIS_STEPS[PROGNOSIS_MOMENTS](exact, {"mode": "exact", "split": "all"})["ones"][-1] == 1


def test_a_two_valued_covariate_with_a_rare_value_is_refused() -> None:
    frames = _uneven(load_rossi(), 3, seed=3)
    f = frames["site-0"]
    frames["site-0"] = f.assign(dose=np.where(np.arange(len(f)) == 2, 60.0, 50.0))  # one patient differs
    floored = prognosis_sites_from_frames(frames, "week", "arrest", min_cell=5, min_cohort=5)["site-0"]
    with pytest.raises(PolicyError, match="min_cell"):
        PROGNOSIS_STEPS[PROGNOSIS_MOMENTS](floored, {**SurvivalOptions(time_bin_days=13).request(), "split": "all"})


def test_the_site_step_refuses_a_rare_reference_level_and_fixes_its_patient_set(tmp_path) -> None:
    """A grade held by one patient is refused though the study drops it as the reference; and the patients a
    reply covers are the same whichever covariates a study names (missing values do not pick them)."""
    from client.steps.prognosis import prognosis_site
    from common.config import load_study_config
    from common.validation import load_site
    from simulations.tabular_sites import write_tabular_sites
    from tests.outcomes.conftest import set_policy

    folder = write_tabular_sites(tmp_path, "gbsg2", sites=2, seed=4)[0]
    set_policy(folder, exact_outcomes=False)
    frame = pd.read_csv(folder / "clinical.csv")
    frame.loc[frame.index[:6], "Progesterone receptor, fmol/l"] = np.nan
    frame.to_csv(folder / "clinical.csv", index=False)
    base = load_study_config(DEFAULT_STUDY_DIR / "prognosis.yaml")
    covs = ("Age (years)", "Positive nodes")
    narrow = base.model_copy(update={"prognosis": base.prognosis.model_copy(update={"covariates": covs,
                                                                                     "levels": {}})})
    wide = base.model_copy(update={"prognosis": base.prognosis.model_copy(
        update={"covariates": (*covs, "Progesterone receptor, fmol/l"), "levels": {}})})
    a = prognosis_site(load_site(folder), narrow).cohorts["train"].survival_ids
    b = prognosis_site(load_site(folder), wide).cohorts["train"].survival_ids
    assert a == b and len(a) > 0  # the 6 with a missing value are out of both
    grade = frame["Tumour grade"].astype(str)
    frame.loc[grade == "I", "Tumour grade"] = "II"
    frame.loc[frame.index[10], "Tumour grade"] = "I"  # one grade-I patient (train or test)
    frame.to_csv(folder / "clinical.csv", index=False)
    reference = base.model_copy(update={"prognosis": base.prognosis.model_copy(update={"encoding": "reference"})})
    with pytest.raises(PolicyError, match="level"):
        prognosis_site(load_site(folder), reference)
