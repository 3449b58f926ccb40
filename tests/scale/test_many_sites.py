"""The statistics phases over many tiny virtual sites in Flower's simulation engine equal the drivers in memory.

24 simulated hospitals (6 patients of 16^3 voxels, tumour features measured from the images) run
fingerprint -> harmonisation -> reduction -> outcomes through :func:`simulations.engine.run_simulated_study`;
each phase's result must equal the same protocol drivers run in this process over in-memory copies of the
sites' data (:class:`common.protocol.InMemoryQuery`), for every one of the 24 sites.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.steps.fingerprint import fingerprint_step
from common.config import load_study_config
from common.fingerprint import aggregate_fingerprints
from common.harmonisation import federated_combat
from common.reduction import Signature, run_reduction_in_memory, settings_from_config
from common.validation import load_site
from simulations.bench_scale import make_sites, study_yaml
from simulations.engine import run_simulated_study
from tests.outcomes.memory import cox_from, kmeans_from, survival_from

N_SITES, PATIENTS, MIN_COHORT = 24, 6, 5
PHASES = ("fingerprint", "harmonisation", "reduction", "outcomes")
INIT = ((-1.0, -1.0), (1.0, 1.0))  # given k-means start (standardised space, 2 factors): same on both sides


def _flat(value: object, prefix: str = "") -> dict[str, object]:
    """A nested dict/list as one flat dict (pytest.approx compares no nested dicts)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def _table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"patient_id": str}).set_index("patient_id")


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict, object]:
    root = tmp_path_factory.mktemp("many-sites")
    sites = make_sites(root / "sites", N_SITES, PATIENTS, size=16, n_features=0)
    study_path = root / "study.yaml"
    study_path.write_text(study_yaml(N_SITES, PHASES,
                                     outcomes=f"{{k: 2, init: given, initial_centres: {[list(c) for c in INIT]}}}"))
    study = load_study_config(study_path)
    assert study.outcomes.init == "given" and study.min_sites == N_SITES
    summary = run_simulated_study(study, study_path, sites, root / "out")
    return sites, summary, study


def test_statistics_phases_over_24_sites_equal_the_drivers_in_memory(flower_run) -> None:
    sites, summary, study = flower_run
    out = summary["outputs"]
    ids = [load_site(d).site_id for d in sites]
    assert len(set(ids)) == N_SITES
    for phase in PHASES:
        assert summary["participants"][phase] == {s: PATIENTS for s in ids}, phase

    # fingerprint: the merged plan equals the sites' steps merged here
    replies = {s: fingerprint_step(load_site(d), study, {}) for s, d in zip(ids, sites, strict=True)}
    expected_fp = json.loads(json.dumps(aggregate_fingerprints(replies, study.sequences)))
    got_fp = out["fingerprint"]
    assert got_fp["n_sites"] == N_SITES and got_fp["n_cases"] == N_SITES * PATIENTS
    for key in ("cases_per_site", "spacing_mean", "spacing_median", "shape_mean", "target_spacing", "intensity"):
        assert _flat(got_fp[key]) == pytest.approx(_flat(expected_fp[key]), rel=1e-12), key
    assert len({v["vendor"] for v in got_fp["scanners"].values()}) > 1  # the sites really differ

    # harmonisation: every site's harmonised table equals in-process federated ComBat (site = batch)
    raw = {s: _table(d / "derived" / "features.csv") for s, d in zip(ids, sites, strict=True)}
    harmonised = federated_combat(raw)
    pooled_sd = pd.concat(raw.values()).std(ddof=0)
    for s, d in zip(ids, sites, strict=True):
        got = _table(d / "derived" / "features_harmonised.csv")
        err = ((got - harmonised[s]).abs() / pooled_sd).to_numpy().max()
        assert err < 1e-9, (s, err)
        assert ((got - raw[s]).abs() / pooled_sd).to_numpy().max() > 0.05  # ComBat changed the table
    assert out["harmonisation"]["n_sites"] == N_SITES and len(out["harmonisation"]["batches"]) == N_SITES

    # reduction: the same signature and the same factor scores at every site
    result, scores = run_reduction_in_memory(harmonised, settings_from_config(study.reduction),
                                             min_cohort=MIN_COHORT)
    signature = Signature.load(out["reduction"]["signature"])
    assert signature.kept == result.signature.kept == out["reduction"]["kept"]
    np.testing.assert_allclose(signature.loadings.to_numpy(), result.signature.loadings.to_numpy(), atol=1e-8)
    for s, d in zip(ids, sites, strict=True):
        np.testing.assert_allclose(_table(d / "derived" / "signature_scores.csv").to_numpy(),
                                   scores[s].to_numpy(), atol=1e-8)

    # outcomes: k-means from the same start, then Kaplan-Meier, log-rank and Cox on the sites' labels
    pooled = pd.concat(scores.values())
    mean, sd = pooled.mean().to_numpy(), pooled.std(ddof=0).to_numpy()
    Z = {s: (scores[s].to_numpy() - mean) / sd for s in ids}
    centres, labels = kmeans_from(Z, 2, np.array(INIT), max_iter=study.outcomes.max_iter, tol=study.outcomes.tol,
                                  min_cohort=MIN_COHORT)
    km = out["outcomes"]["kmeans"]
    assert km["converged"] and km["n_patients"] == N_SITES * PATIENTS
    assert min(g["n"] for g in out["outcomes"]["groups"].values()) >= 20  # two real clusters, over many sites
    np.testing.assert_allclose(np.array(km["centres"]), centres, atol=1e-9)
    durations, events, groups, frames = {}, {}, {}, {}
    for s, d in zip(ids, sites, strict=True):
        clusters = _table(d / "derived" / "clusters.csv")["cluster"]
        np.testing.assert_array_equal(clusters.to_numpy(), labels[s])  # labels stayed at the site, and agree
        clinical = load_site(d).clinical_frame().loc[clusters.index]
        durations[s], events[s], groups[s] = clinical["os_days"], clinical["os_event"], clusters
        frames[s] = pd.DataFrame({"T": clinical["os_days"], "E": clinical["os_event"],
                                  "cluster_1": (clusters == 1).astype(float)})
    assert out["outcomes"]["mode"] == "exact" and sorted(out["outcomes"]["sites"]) == sorted(ids)
    detail = json.loads(Path(next(a["path"] for a in out["outcomes"]["artifacts"]
                                  if a["path"].endswith(".json"))).read_text())
    for g in (0, 1):
        members = {s: groups[s] == g for s in ids if (groups[s] == g).any()}  # sites with patients in g
        curve = survival_from({s: durations[s][m] for s, m in members.items()},
                              {s: events[s][m] for s, m in members.items()}, min_cohort=1).pooled()
        np.testing.assert_allclose(detail["groups"][f"cluster_{g}"]["timeline"], curve.index.to_numpy())
        np.testing.assert_allclose(detail["groups"][f"cluster_{g}"]["survival"], curve["survival"].to_numpy(),
                                   atol=1e-12)
    test = survival_from(durations, events, groups, min_cohort=MIN_COHORT).logrank
    assert out["outcomes"]["logrank"]["test_statistic"] == pytest.approx(test.test_statistic, rel=1e-10)
    cox = cox_from(frames, "T", "E", min_cohort=MIN_COHORT).coefficients()
    assert out["outcomes"]["cox"]["covariates"]["cluster_1"]["coef"] == pytest.approx(cox["cluster_1"], abs=1e-8)
