"""Federated ComBat equals neuroCombat 0.2.12 on the pooled data, for every option and site layout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.combat_estimator import ComBat
from common.combat_spec import CombatOptions
from common.harmonisation import federated_combat, run_harmonisation_in_memory
from simulations.synthetic_features import synthetic_feature_sites
from tests.harmonisation.oracle import max_rel_diff, pooled, pooled_neurocombat

N_FEATURES = 25
TOL = 1e-8  # relative to each feature's pooled sd

# sizes per site, scanners each site draws from (None: the site is the batch), the reference batch
LAYOUTS = {
    "2-sites": ([9, 31], None, "site-02"),
    "10-sites-uneven": ([5, 41, 12, 7, 23, 9, 30, 6, 15, 11], None, "site-04"),
    "scanner-spans-sites": ([14, 25, 9, 33, 12], [["A", "B"], ["A"], ["C"], ["B", "C"], ["A"]], "A"),
    "two-scanners-in-one-site": ([20, 8, 16], [["A", "B"], ["C"], ["D"]], "B"),
}
BOTH = {"categorical": ("sex", "grade"), "continuous": ("age",)}
OPTIONS = {
    "default": {**BOTH},
    "no-eb": {**BOTH, "eb": False},
    "non-parametric": {**BOTH, "parametric": False},
    "mean-only": {**BOTH, "mean_only": True},
    "mean-only-non-parametric": {**BOTH, "mean_only": True, "parametric": False},
    "mean-only-no-eb": {**BOTH, "mean_only": True, "eb": False},
    "ref": {**BOTH, "ref_batch": "REF"},
    "ref-non-parametric": {**BOTH, "ref_batch": "REF", "parametric": False},
    "ref-no-eb": {**BOTH, "ref_batch": "REF", "eb": False},
    "ref-mean-only": {**BOTH, "ref_batch": "REF", "mean_only": True},
    "no-covariates": {},
    "categorical-only": {"categorical": ("grade",)},
    "continuous-only": {"continuous": ("age",)},
}


def _layout(name: str, seed: int = 0):
    sizes, scanners, ref = LAYOUTS[name]
    features, covariates = synthetic_feature_sites(sizes, N_FEATURES, seed=seed, scanners=scanners)
    return features, covariates, ("scanner" if scanners else None), ref


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_federated_combat_equals_pooled_neurocombat(layout: str, option: str) -> None:
    features, covariates, batch, ref = _layout(layout)
    kwargs = {k: (ref if v == "REF" else v) for k, v in OPTIONS[option].items()}

    harmonised = federated_combat(features, covariates, batch=batch, **kwargs)
    expected, _ = pooled_neurocombat(features, covariates, batch=batch, **kwargs)

    raw, _ = pooled(features)
    got = pd.concat(harmonised.values())
    assert list(harmonised) == list(features)
    for site in features:
        assert harmonised[site].index.equals(features[site].index)
        assert harmonised[site].columns.equals(features[site].columns)
    assert max_rel_diff(got, expected, raw) <= TOL
    # not a no-op: the patients outside the reference batch moved by a sizeable part of an sd
    assert max_rel_diff(got, raw, raw) > 0.05


@pytest.mark.parametrize("layout", ["scanner-spans-sites", "two-scanners-in-one-site", "10-sites-uneven"])
@pytest.mark.parametrize("option", ["default", "non-parametric", "ref"])
def test_federated_model_equals_pooled_state(layout: str, option: str) -> None:
    features, covariates, batch, ref = _layout(layout, seed=3)
    kwargs = {k: (ref if v == "REF" else v) for k, v in OPTIONS[option].items()}
    options = CombatOptions(batch=batch, **kwargs)

    _, result = run_harmonisation_in_memory(features, covariates, options)
    _, est = pooled_neurocombat(features, covariates, batch=batch, **kwargs)
    table, cov = pooled(features, covariates)
    pooled_fit = ComBat(batch=batch or "_site", **kwargs).fit(table, cov)

    model = result.model
    spans = layout == "scanner-spans-sites"
    assert ("combat_batch" in result.rounds) is spans
    # neuroCombat's batches are sorted labels (integer codes on its ref_batch path)
    assert list(model.batches) == sorted(pooled(features, covariates)[1][batch or "_site"].unique())
    if "ref_batch" not in kwargs:
        assert model.batches == tuple(str(b) for b in est["batches"])
    scale = table.to_numpy().std(axis=0)
    # neuroCombat's own estimates (standardised units, and the pooled variance relative to itself)
    np.testing.assert_allclose(model.var_pooled, est["var.pooled"].ravel(), rtol=1e-10)
    np.testing.assert_allclose(model.estimates.gamma_star, est["gamma.star"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.estimates.delta_star, est["delta.star"], rtol=1e-10)
    # the pooled estimator's fitted state, attribute by attribute
    np.testing.assert_allclose(model.grand_mean / scale, pooled_fit.grand_mean_ / scale, rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.beta / scale, pooled_fit.beta_ / scale, rtol=0, atol=1e-8)
    for key in ("gamma_hat", "delta_hat", "gamma_star", "delta_star", "gamma_bar", "t2"):
        np.testing.assert_allclose(getattr(model.estimates, key), getattr(pooled_fit, f"{key}_"), rtol=1e-9,
                                   atol=1e-12, err_msg=key)
    assert result.cases == {s: len(f) for s, f in features.items()}


def test_neurocombat_traps_are_real() -> None:
    """Why the oracle feeds float64 ndarrays and float32-exact ages, and aliases np.int (docs/COMBAT.md)."""
    from neuroCombat import neuroCombat

    features, covariates, _, _ = _layout("2-sites")
    table, cov = pooled(features, covariates)
    quiet = __import__("contextlib").redirect_stdout(__import__("io").StringIO())
    # 1. the ref_batch path calls np.int, which numpy >= 1.24 no longer has
    assert "int" not in vars(np)
    with pytest.raises(AttributeError, match="int"), quiet:
        neuroCombat(table.to_numpy().T.copy(), cov[["_site"]], "_site", ref_batch="site-02")
    # 2. a DataFrame `dat` is cast to float32: far outside the 1e-8 tolerance
    as_frame, _ = pooled_neurocombat(features)
    with quiet:
        cast = neuroCombat(table.T, cov[["_site"]], "_site")["data"].T
    assert max_rel_diff(pd.DataFrame(cast, index=table.index, columns=table.columns), as_frame, table) > 1e-8
    # 3. continuous covariates are cast to float32: with float64 ages, neuroCombat equals our ComBat fed
    #    float32-rounded ages, not the ages themselves
    cov = cov.assign(age=cov["age"] + 1e-3 / 3)
    with quiet:
        theirs = neuroCombat(table.to_numpy().T.copy(), cov[["_site", "age"]], "_site", continuous_cols=["age"])
    theirs = pd.DataFrame(theirs["data"].T, index=table.index, columns=table.columns)
    ours = ComBat("_site", continuous=["age"]).fit_transform(table, cov)
    rounded = ComBat("_site", continuous=["age"]).fit_transform(
        table, cov.assign(age=cov["age"].astype(np.float32).astype(np.float64)))
    assert max_rel_diff(ours, theirs, table) > 1e-8
    assert max_rel_diff(rounded, theirs, table) <= TOL
