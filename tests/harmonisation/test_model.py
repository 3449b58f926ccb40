"""The stored ComBat model: new cases of a known site, a site joining later, save/load of the federated model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.combat_estimator import ComBat
from common.combat_model import CombatModel
from common.combat_spec import CombatOptions
from common.harmonisation import run_harmonisation_in_memory
from simulations.synthetic_features import synthetic_feature_sites
from tests.harmonisation.oracle import max_rel_diff, pooled, pooled_neurocombat

COVS = {"categorical": ("sex",), "continuous": ("age",)}


def test_new_cases_of_a_known_site_get_the_training_output() -> None:
    features, covariates = synthetic_feature_sites([15, 22, 11], 20, seed=5)
    table, cov = pooled(features, covariates)
    combat = ComBat("_site", **COVS)
    fitted = combat.fit_transform(table, cov)

    # one patient at a time, as new cases arrive (neuroCombatFromTraining cannot do this with covariates)
    rows = [0, 17, 40, len(table) - 1]
    one_by_one = pd.concat([combat.transform(table.iloc[[i]], cov.iloc[[i]]) for i in rows])
    assert max_rel_diff(one_by_one, fitted, table) <= 1e-12
    assert combat.n_features_in_ == 20 and combat.batches_ == ("site-01", "site-02", "site-03")


def test_federated_model_saved_and_loaded_harmonises_like_the_run(tmp_path) -> None:
    features, covariates = synthetic_feature_sites([12, 30, 9, 17], 15, seed=6,
                                                   scanners=[["A", "B"], ["A"], ["C"], ["B"]])
    options = CombatOptions(batch="scanner", parametric=False, **COVS)
    harmonised, result = run_harmonisation_in_memory(features, covariates, options)

    model = CombatModel.load(result.model.save(tmp_path / "combat.npz"))
    estimator = ComBat.from_model(model)
    for site in features:
        again = estimator.transform(features[site], covariates[site])
        assert max_rel_diff(again, harmonised[site], features[site]) <= 1e-12
    np.testing.assert_array_equal(model.beta, result.model.beta)
    assert model.spec == result.model.spec


def test_a_joining_batch_is_treated_as_a_fitted_batch() -> None:
    """Relabel a fitted site as new: its estimates and output are those it got in the fit."""
    features, covariates = synthetic_feature_sites([14, 25, 19], 18, seed=8)
    harmonised, result = run_harmonisation_in_memory(features, covariates, CombatOptions(**COVS))
    model = result.model

    joined = model.with_new_batches(features["site-03"], ["site-03-again"] * 19, covariates["site-03"])
    old, new = model.batches.index("site-03"), joined.batches.index("site-03-again")
    for key in ("gamma_hat", "delta_hat", "gamma_star", "delta_star", "gamma_bar", "t2", "a_prior", "b_prior"):
        np.testing.assert_allclose(getattr(joined.estimates, key)[new], getattr(model.estimates, key)[old],
                                   rtol=1e-12, atol=1e-14, err_msg=key)
    out = joined.transform(features["site-03"], ["site-03-again"] * 19, covariates["site-03"])
    assert np.abs(out - harmonised["site-03"].to_numpy()).max() / features["site-03"].to_numpy().std() < 1e-12


def test_a_site_joining_later_equals_pooled_neurocombat_with_a_reference_batch() -> None:
    """With ref_batch, ComBat of (reference + newcomer) depends on the newcomer only through its own batch: a model
    fitted on the reference site alone, extended with the newcomer, equals neuroCombat on both pooled."""
    features, _ = synthetic_feature_sites([30, 21], 16, seed=9)
    reference, newcomer = {"site-01": features["site-01"]}, features["site-02"]

    _, result = run_harmonisation_in_memory(reference, None, CombatOptions(ref_batch="site-01"))
    model = result.model.with_new_batches(newcomer, ["site-02"] * len(newcomer))
    estimator = ComBat(batch="_site", ref_batch="site-01").fit(*pooled(reference))
    estimator.add_batches(newcomer, pd.DataFrame({"_site": "site-02"}, index=newcomer.index))

    expected, _ = pooled_neurocombat(features, ref_batch="site-01")
    got = pd.DataFrame(model.transform(newcomer, ["site-02"] * len(newcomer)), newcomer.index, newcomer.columns)
    assert max_rel_diff(got, expected, newcomer) <= 1e-8
    via_estimator = estimator.transform(newcomer, pd.DataFrame({"_site": "site-02"}, index=newcomer.index))
    assert max_rel_diff(via_estimator, expected, newcomer) <= 1e-8
    assert estimator.batches_ == ("site-01", "site-02")


def _site_on_disk(root, index: int, table: pd.DataFrame):
    from common.sitedata import CLINICAL_COLUMNS, write_site_config
    from simulations.phantoms import site_config_for

    config = site_config_for(index, seed=0)
    site_dir = root / config.site_id
    write_site_config(config, site_dir)
    pd.DataFrame(columns=list(CLINICAL_COLUMNS)).to_csv(site_dir / "clinical.csv", index=False)  # no covariates used
    (site_dir / "derived").mkdir()
    table.rename_axis("patient_id").to_csv(site_dir / "derived" / "features.csv")
    return site_dir


def test_cli_harmonises_known_and_joining_sites_with_the_stored_model(tmp_path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    synth, _ = synthetic_feature_sites([25, 18], 12, seed=12)
    features = {"site-001": synth["site-01"], "site-002": synth["site-02"]}
    dirs = {s: _site_on_disk(tmp_path, i, t) for i, (s, t) in enumerate(features.items())}
    reference = {"site-001": features["site-001"]}
    harmonised, result = run_harmonisation_in_memory(reference, None, CombatOptions(ref_batch="site-001"))
    model_path = result.model.save(tmp_path / "combat_model.npz")

    runner = CliRunner()
    for site in ("site-001", "site-002"):  # a known site's new cases, then a site joining later
        out = runner.invoke(app, ["harmonise", str(dirs[site]), "--model", str(model_path),
                                  "--save-model", str(tmp_path / f"extended-{site}.npz")])
        assert out.exit_code == 0, out.output
    known = pd.read_csv(dirs["site-001"] / "derived" / "features_harmonised.csv", index_col="patient_id")
    assert max_rel_diff(known, harmonised["site-001"], features["site-001"]) <= 1e-12
    joined = pd.read_csv(dirs["site-002"] / "derived" / "features_harmonised.csv", index_col="patient_id")
    expected, _ = pooled_neurocombat(features, ref_batch="site-001")
    assert max_rel_diff(joined, expected, features["site-002"]) <= 1e-8
    assert CombatModel.load(tmp_path / "extended-site-002.npz").batches == ("site-001", "site-002")
