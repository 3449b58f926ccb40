"""The harmonisation and reduction phases through Flower's simulation engine, against pooled neuroCombat."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.combat_model import CombatModel
from common.config import load_study_config
from common.reduction_fit import prune_correlated
from common.reduction_signature import Signature
from simulations.synthetic_features import synthetic_feature_sites
from tests.harmonisation.oracle import max_rel_diff, pooled_neurocombat

P = 8
SCANNER = {"site-001": "X", "site-002": "Y", "site-003": "X"}  # scanner X spans two sites: all five rounds run
STUDY = """name: combat-flower
phases: [harmonisation, reduction]
min_sites: 3
round_timeout_s: 120
harmonisation: {batch: scanner, continuous: [age]}
reduction: {n_factors: 2, correlation_threshold: 0.95}
"""


def _prepare(site_dirs) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """A synthetic features.csv in each site's derived/ folder; clinical.csv gets the scanner and float32-exact
    ages (neuroCombat rounds continuous covariates to float32)."""
    names = [d.name for d in site_dirs]
    synth, synth_cov = synthetic_feature_sites([6] * len(site_dirs), P, seed=11,
                                               scanners=[[SCANNER[n]] for n in names])
    features, covariates = {}, {}
    for site_dir, (table, cov) in zip(site_dirs, zip(synth.values(), synth_cov.values(), strict=True), strict=True):
        clinical = pd.read_csv(site_dir / "clinical.csv", dtype={"patient_id": str})
        ids = pd.Index(clinical["patient_id"], name="patient_id")
        clinical["age"] = cov["age"].to_numpy()
        clinical["scanner"] = cov["scanner"].to_numpy()
        clinical.to_csv(site_dir / "clinical.csv", index=False)
        table = table.set_axis(ids, axis=0)
        (site_dir / "derived").mkdir(exist_ok=True)
        table.to_csv(site_dir / "derived" / "features.csv")
        features[site_dir.name] = table
        covariates[site_dir.name] = clinical.set_index("patient_id")[["age", "scanner"]]
    return features, covariates


def test_harmonisation_and_reduction_phases_through_flower(writable_sites, tmp_path) -> None:
    from simulations.engine import run_simulated_study

    features, covariates = _prepare(writable_sites)
    study_path = tmp_path / "study.yaml"
    study_path.write_text(STUDY)
    study = load_study_config(study_path)

    summary = run_simulated_study(study, study_path, writable_sites, tmp_path / "out")

    harm, red = summary["outputs"]["harmonisation"], summary["outputs"]["reduction"]
    assert harm["rounds"] == ["combat_summary", "combat_fit", "combat_var", "combat_batch", "combat_apply"]
    assert summary["participants"]["harmonisation"] == {"site-001": 6, "site-002": 6, "site-003": 6}
    assert harm["batch_sites"] == {"X": ["site-001", "site-003"], "Y": ["site-002"]}
    expected, estimates = pooled_neurocombat(features, covariates, batch="scanner", continuous=["age"])
    raw = pd.concat(features.values())
    got = pd.concat([pd.read_csv(d / "derived" / "features_harmonised.csv", dtype={"patient_id": str})
                     .set_index("patient_id") for d in writable_sites])
    assert max_rel_diff(got, expected, raw) <= 1e-8
    assert max_rel_diff(got, raw, raw) > 0.05

    [artifact] = harm["artifacts"]
    assert artifact["kind"] == "harmonisation" and artifact["metrics"]["site-002"] == {"n_cases": 6.0}
    model = CombatModel.load(artifact["path"])
    np.testing.assert_allclose(model.estimates.gamma_star, estimates["gamma.star"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.var_pooled, estimates["var.pooled"].ravel(), rtol=1e-10)

    [sig_artifact] = red["artifacts"]
    assert sig_artifact["kind"] == "signature" and sig_artifact["parent_kind"] == "harmonisation"
    signature = Signature.load(sig_artifact["path"])
    pooled_corr = np.corrcoef(expected[signature.correlation.index].to_numpy().T)
    assert np.abs(signature.correlation.to_numpy() - pooled_corr).max() <= 1e-10
    keep, _ = prune_correlated(pooled_corr, 0.95)
    assert signature.kept == list(signature.correlation.index[keep]) == red["kept"]
    for d in writable_sites:
        scores = pd.read_csv(d / "derived" / "signature_scores.csv", dtype={"patient_id": str}).set_index("patient_id")
        assert list(scores.columns) == ["factor_1", "factor_2"] and len(scores) == 6
        np.testing.assert_allclose(scores.to_numpy(), signature.scores(got.loc[scores.index]).to_numpy(), atol=1e-9)
    assert len(summary["registry"]["versions"]) == 2
