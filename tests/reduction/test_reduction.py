"""Federated feature reduction equals the pooled computation on the concatenated data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.errors import PolicyError, ProtocolError
from common.reduction import federated_feature_reduction, run_reduction_in_memory
from common.reduction_fit import prune_correlated
from common.reduction_signature import ReductionError, ReductionSettings, Signature
from simulations.synthetic_features import synthetic_feature_sites

VAR_T, CORR_T, K = 1e-4, 0.9, 3


def _sites(seed: int = 0) -> dict[str, pd.DataFrame]:
    features, _ = synthetic_feature_sites([8, 30, 17, 25, 11], 30, seed=seed, n_latent=3)
    rng = np.random.default_rng(seed)
    for i, table in enumerate(features.values()):
        table["near_constant"] = 5.0 + 1e-3 * rng.normal(size=len(table))  # variance ~1e-6 < VAR_T
        table["copy_of_0007"] = 3.0 * table["feature_0007"] + 1e-3 * table["feature_0007"].std() * rng.normal(
            size=len(table)) + i  # |r| ~ 1 with feature_0007 (the site offset is shared by no other feature)
        base = table["feature_0010"] / table["feature_0010"].std()
        for name, noise in (("chain_a", 0.15), ("chain_b", 0.3), ("chain_c", 0.45)):  # a chain of |r| 0.9-0.99
            table[name] = base + noise * rng.normal(size=len(table))
    return features


def _naive_prune(corr: np.ndarray, threshold: float) -> np.ndarray:
    """The documented rule, the slow way: take the most correlated kept pair, drop the one with the larger mean |r|."""
    a = np.abs(corr.copy())
    np.fill_diagonal(a, 0)
    keep = np.ones(len(a), dtype=bool)
    while True:
        sub = np.where(np.outer(keep, keep), a, 0)
        i, j = np.unravel_index(np.argmax(np.triu(sub, 1)), sub.shape)
        if sub[i, j] <= threshold:
            return keep
        mac = sub.sum(axis=1) / (keep.sum() - 1)
        keep[i if mac[i] > mac[j] + 1e-12 else j] = False


def _match(reference: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """``ours`` with its columns permuted and signed to match ``reference``."""
    cos = np.abs(reference.T @ ours) / np.outer(np.linalg.norm(reference, axis=0), np.linalg.norm(ours, axis=0))
    perm = cos.argmax(axis=1)
    assert sorted(perm) == list(range(ours.shape[1]))
    matched = ours[:, perm]
    return matched * np.sign((reference * matched).sum(axis=0))


def test_reduction_equals_pooled_computation() -> None:
    from sklearn.decomposition import FactorAnalysis
    from sklearn.feature_selection import VarianceThreshold

    features = _sites()
    signature = federated_feature_reduction(features, variance_threshold=VAR_T, correlation_threshold=CORR_T,
                                            n_factors=K)
    kept, corr, loadings = signature
    table = pd.concat(features.values())

    support = VarianceThreshold(VAR_T).fit(table.to_numpy()).get_support()
    assert list(corr.index) == list(table.columns[support]) and "near_constant" not in corr.index
    pooled_corr = np.corrcoef(table[corr.index].to_numpy().T)
    assert np.abs(corr.to_numpy() - pooled_corr).max() <= 1e-10
    keep = _naive_prune(pooled_corr, CORR_T)
    assert kept == list(corr.index[keep])
    assert np.array_equal(prune_correlated(pooled_corr, CORR_T)[0], keep)
    assert ("feature_0007" in kept) != ("copy_of_0007" in kept)
    assert len(kept) <= len(corr.index) - 3 and len(signature.dropped) == len(table.columns) - len(kept)

    z = table[kept].to_numpy()
    z = (z - z.mean(axis=0)) / z.std(axis=0)
    fa = FactorAnalysis(K, rotation="varimax", svd_method="lapack").fit(z)
    assert signature.n_iter == fa.n_iter_
    reference = fa.components_.T
    assert np.abs(_match(reference, loadings.to_numpy()) - reference).max() <= 1e-8
    np.testing.assert_allclose(signature.noise_variance.to_numpy(), fa.noise_variance_, rtol=1e-8)

    # the sites' factor scores are scikit-learn's transform of the pooled standardised data
    result, scores = run_reduction_in_memory(features, signature.settings)
    ours = pd.concat(scores.values()).loc[table.index].to_numpy()
    theirs = fa.transform(z)
    assert np.abs(_match(theirs, ours) - theirs).max() <= 1e-8
    assert result.cases == {s: len(t) for s, t in features.items()}


def test_signature_saved_and_loaded(tmp_path) -> None:
    features = _sites(1)
    signature = federated_feature_reduction(features, variance_threshold=VAR_T, correlation_threshold=CORR_T,
                                            n_factors=2)
    loaded = Signature.load(signature.save(tmp_path / "signature.npz"))
    pd.testing.assert_frame_equal(loaded.loadings, signature.loadings)
    pd.testing.assert_frame_equal(loaded.correlation, signature.correlation)
    assert loaded.dropped == signature.dropped and loaded.settings == signature.settings
    table = features["site-02"]
    pd.testing.assert_frame_equal(loaded.scores(table), signature.scores(table))


def test_reduction_bad_inputs_name_the_site() -> None:
    features = _sites(2)
    other = dict(features, **{"site-03": features["site-03"].drop(columns="feature_0004")})
    with pytest.raises(ProtocolError, match=r"site-03.*feature_0004"):
        federated_feature_reduction(other, variance_threshold=0, correlation_threshold=0.9, n_factors=2)
    nan = {s: t.copy() for s, t in features.items()}
    nan["site-04"].iloc[3, 2] = np.nan
    with pytest.raises(ProtocolError, match=r"site-04.*feature_0002"):
        federated_feature_reduction(nan, variance_threshold=0, correlation_threshold=0.9, n_factors=2)
    with pytest.raises(PolicyError, match=r"site-01.*min_cohort"):
        run_reduction_in_memory(features, ReductionSettings(), min_cohort=9)
    with pytest.raises(ReductionError, match="n_factors=40"):
        federated_feature_reduction(features, variance_threshold=0, correlation_threshold=0.9, n_factors=40)
