"""Bad input gets a clear error naming the site (and the column, batch or rule), never a wrong answer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from common.combat_spec import CombatDataError, CombatOptions
from common.errors import PolicyError, ProtocolError, SiteDataError
from common.harmonisation import federated_combat, run_harmonisation_in_memory
from simulations.synthetic_features import synthetic_feature_sites


def _sites(sizes=(10, 12, 8), scanners=None, p=6, seed=0):
    return synthetic_feature_sites(list(sizes), p, seed=seed, scanners=scanners)


def test_different_feature_columns_name_the_site() -> None:
    features, _ = _sites()
    features["site-02"] = features["site-02"].drop(columns="feature_0003")
    with pytest.raises(ProtocolError, match=r"site-02.*feature_0003") as err:
        federated_combat(features)
    assert err.value.site_id == "site-02"


def test_same_features_in_another_order_are_fine() -> None:
    features, _ = _sites()
    expected = federated_combat(features)
    features["site-03"] = features["site-03"][features["site-03"].columns[::-1]]
    got = federated_combat(features)
    pd.testing.assert_frame_equal(got["site-03"][expected["site-03"].columns], expected["site-03"], rtol=1e-12)


def test_nan_values_name_the_site_and_column() -> None:
    features, _ = _sites()
    features["site-03"].iloc[2, 4] = np.nan
    with pytest.raises(ProtocolError, match=r"site-03.*NaN.*feature_0004"):
        federated_combat(features)


def test_nan_covariate_names_the_site() -> None:
    features, covariates = _sites()
    covariates["site-01"].loc[covariates["site-01"].index[0], "age"] = np.nan
    with pytest.raises(ProtocolError, match=r"site-01.*'age'"):
        federated_combat(features, covariates, continuous=["age"])


def test_feature_constant_within_a_batch_names_the_site() -> None:
    features, _ = _sites()
    features["site-02"]["feature_0001"] = 7.25
    with pytest.raises(ProtocolError, match=r"site-02.*feature_0001.*constant within batch 'site-02'"):
        federated_combat(features)


def test_feature_constant_within_a_batch_spanning_sites_names_every_holder() -> None:
    features, covariates = _sites(scanners=[["A", "B"], ["A"], ["B"]])
    for site in ("site-01", "site-02"):
        rows = covariates[site]["scanner"] == "A"
        features[site].loc[rows, "feature_0005"] = 0.1
    with pytest.raises(ProtocolError, match=r"site-01, site-02.*feature_0005.*constant within batch 'A'"):
        federated_combat(features, covariates, batch="scanner")


def test_batch_with_one_patient_names_the_site() -> None:
    features, _ = _sites(sizes=(10, 1, 8))
    with pytest.raises(ProtocolError, match=r"site-02.*batch 'site-02' has 1 patient"):
        federated_combat(features)


def test_site_below_min_cohort_refuses() -> None:
    features, _ = _sites(sizes=(10, 12, 8))
    with pytest.raises(PolicyError, match=r"site-03.*min_cohort.*8 patient") as err:
        run_harmonisation_in_memory(features, None, CombatOptions(), min_cohort=9)
    assert err.value.rule == "min_cohort"


def test_small_covariate_cell_refuses() -> None:
    """W'Y holds a sum per categorical level: a level with fewer than min_cohort patients would expose them."""
    features, covariates = _sites(sizes=(10, 12, 8))
    for cov in covariates.values():
        cov["sex"] = "F"
    cov = covariates["site-02"]
    cov.loc[cov.index[:2], "sex"] = "M"
    with pytest.raises(PolicyError, match=r"site-02.*sex=M"):
        run_harmonisation_in_memory(features, covariates, CombatOptions(categorical=("sex",)), min_cohort=5)


def test_unknown_reference_batch() -> None:
    features, _ = _sites()
    with pytest.raises(ProtocolError, match="ref_batch 'site-09'"):
        federated_combat(features, ref_batch="site-09")


def test_covariate_confounded_with_batch_is_named() -> None:
    features, covariates = _sites()
    for site, cov in covariates.items():
        cov["centre_type"] = "teaching" if site == "site-01" else "district"
    with pytest.raises(CombatDataError, match="centre_type"):
        federated_combat(features, covariates, categorical=["centre_type"])


def test_non_numeric_feature_names_the_site() -> None:
    features, _ = _sites()
    features["site-01"]["feature_0002"] = "high"
    with pytest.raises(ProtocolError, match=r"site-01.*feature_0002.*not numeric"):
        federated_combat(features)


# ------------------------------------------------------------------------------ the Flower site step


def _write_features(site_dir, seed: int) -> pd.DataFrame:
    clinical = pd.read_csv(site_dir / "clinical.csv", dtype={"patient_id": str})
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(rng.normal(size=(len(clinical), 5)), columns=[f"f{i}" for i in range(5)],
                         index=pd.Index(clinical["patient_id"], name="patient_id"))
    (site_dir / "derived").mkdir(exist_ok=True)
    table.to_csv(site_dir / "derived" / "features.csv")
    return table


def test_site_step_enforces_min_cohort_and_names_missing_files(writable_sites) -> None:
    from client.guard import check_request
    from client.steps import SITE_STEPS
    from common.config import StudyConfig
    from common.validation import load_site

    study = StudyConfig(harmonisation={"continuous": ["age"]})
    site_dir = writable_sites[0]
    step = SITE_STEPS["combat_summary"]
    site = load_site(site_dir)
    with pytest.raises(SiteDataError, match=r"features\.csv.*missing"):
        step.run(site, study, {"options": "{}"})

    _write_features(site_dir, 0)
    cfg = yaml.safe_load((site_dir / "site.yaml").read_text())
    cfg["policy"]["min_cohort"] = 7  # the site has 6 patients
    (site_dir / "site.yaml").write_text(yaml.safe_dump(cfg))
    site = load_site(site_dir)
    assert step.n_cases(site) == 6
    with pytest.raises(PolicyError, match=r"site-001.*min_cohort"):
        check_request(site.config, step.phase, study.hash, step.n_cases(site))
    options = '{"batch": null, "categorical": [], "continuous": ["age"], "eb": true, "mean_only": false, ' \
              '"parametric": true, "ref_batch": null}'
    with pytest.raises(PolicyError, match=r"site-001.*min_cohort.*6 patient"):
        step.run(site, study, {"options": options})
