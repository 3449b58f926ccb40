"""Federated k-means (:func:`common.outcomes.run_kmeans` over in-memory sites) equals scikit-learn's Lloyd k-means
on the pooled rows, from the same initial centres."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from common.errors import PolicyError, ProtocolError
from common.kmeans import site_cluster_sums
from tests.outcomes.memory import kmeans_from, kmeanspp_centres


def _sites(n_sites: int, seed: int, d: int = 3, k_true: int = 3) -> dict[str, np.ndarray]:
    """Uneven sites (6 to ~60 patients) drawn from a mixture whose proportions differ per site."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3.0, size=(k_true, d))
    out = {}
    for i in range(n_sites):
        n = int(rng.integers(6, 60))
        comp = rng.choice(k_true, size=n, p=rng.dirichlet(np.ones(k_true)))
        out[f"site-{i:02d}"] = means[comp] + rng.normal(size=(n, d))
    return out


def _pooled(X: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([X[s] for s in sorted(X)])


@pytest.mark.parametrize(("n_sites", "k", "seed"), [(2, 2, 0), (3, 3, 1), (5, 4, 2), (8, 3, 3)])
def test_centres_and_labels_equal_sklearn(n_sites: int, k: int, seed: int) -> None:
    X = _sites(n_sites, seed)
    pooled = _pooled(X)
    init = pooled[np.random.default_rng(seed).choice(len(pooled), size=k, replace=False)]
    centres, labels = kmeans_from(X, k, init)
    ref = KMeans(n_clusters=k, init=init, n_init=1, algorithm="lloyd").fit(pooled)
    assert np.abs(centres - ref.cluster_centers_).max() < 1e-8
    assert np.array_equal(np.concatenate([labels[s] for s in sorted(X)]), ref.labels_)
    assert {s: len(v) for s, v in labels.items()} == {s: len(v) for s, v in X.items()}


@pytest.mark.parametrize(("max_iter", "tol"), [(2, 1e-4), (300, 0.5), (300, 0.0)])
def test_stopping_rules_equal_sklearn(max_iter: int, tol: float) -> None:
    """Stopping on max_iter or on the centre shift (not on stable labels) still matches, final labels included."""
    X = _sites(4, 7, k_true=4)
    pooled = _pooled(X)
    init = pooled[:3] + 0.5
    centres, labels = kmeans_from(X, 3, init, max_iter=max_iter, tol=tol)
    ref = KMeans(n_clusters=3, init=init, n_init=1, algorithm="lloyd", max_iter=max_iter, tol=tol).fit(pooled)
    assert np.abs(centres - ref.cluster_centers_).max() < 1e-8
    assert np.array_equal(np.concatenate([labels[s] for s in sorted(X)]), ref.labels_)


def test_federated_kmeanspp_is_seeded_and_separates_clusters() -> None:
    X = _sites(4, 11, k_true=3)
    a = kmeanspp_centres(X, 3, seed=5, min_cell=5)
    b = kmeanspp_centres(X, 3, seed=5, min_cell=5)
    assert np.array_equal(a, b)
    assert len({tuple(np.round(c, 9)) for c in a}) == 3
    centres, _ = kmeans_from(X, 3, a)
    pooled = _pooled(X)
    ref = KMeans(n_clusters=3, n_init=10, random_state=0).fit(pooled)
    assert abs(((pooled[:, None] - centres[None]) ** 2).sum(2).min(1).sum() - ref.inertia_) / ref.inertia_ < 0.05


def test_small_clusters_are_withheld_and_change_the_centres() -> None:
    """With min_cell, a site withholds the sum of a cluster it holds fewer than min_cell patients of."""
    X = np.vstack([np.zeros((8, 2)), np.full((2, 2), 10.0)])
    reply = site_cluster_sums("site-a", X, np.array([[0.0, 0.0], [10.0, 10.0]]), min_cell=5)
    assert reply["suppressed"] == 1
    assert np.array_equal(reply["counts"], [8.0, 0.0]) and np.all(reply["sums"][1] == 0)
    exact = site_cluster_sums("site-a", X, np.array([[0.0, 0.0], [10.0, 10.0]]), min_cell=1)
    assert np.array_equal(exact["counts"], [8.0, 2.0]) and np.allclose(exact["sums"][1], [20.0, 20.0])
    sites = {"a": X, "b": np.vstack([np.ones((6, 2)), np.full((6, 2), 11.0)])}
    init = np.array([[0.0, 0.0], [10.0, 10.0]])
    c_exact, _ = kmeans_from(sites, 2, init)
    c_supp, _ = kmeans_from(sites, 2, init, min_cell=5)
    assert np.allclose(c_exact[1], [(20 + 66) / 8] * 2) and np.allclose(c_supp[1], [11.0, 11.0])


def test_bad_inputs_name_the_site() -> None:
    X = _sites(3, 0)
    init = _pooled(X)[:2]
    small = dict(X, **{"site-tiny": X["site-00"][:3]})
    with pytest.raises(PolicyError, match="site-tiny.*min_cohort"):
        kmeans_from(small, 2, init)
    nan = dict(X)
    nan["site-01"] = X["site-01"].copy()
    nan["site-01"][0, 1] = np.nan
    with pytest.raises(ProtocolError, match="site-01.*NaN"):
        kmeans_from(nan, 2, init)
    wide = dict(X, **{"site-02": np.hstack([X["site-02"], X["site-02"]])})
    with pytest.raises(ProtocolError, match="site-02"):
        kmeans_from(wide, 2, init)
    with pytest.raises(ProtocolError, match="centres"):
        kmeans_from(X, 3, init)


def test_a_reply_counting_more_patients_than_its_site_has_is_refused() -> None:
    """Issue 21 (4): k-means sums consistent with the site's cohort: inflated counts (a site steering the
    centres) are refused."""
    from common.kmeans import lloyd_update, site_cluster_sums

    x = np.random.default_rng(0).normal(size=(10, 2))
    centres = np.array([[-1.0, 0.0], [1.0, 0.0]])
    honest = site_cluster_sums("a", x, centres)
    lloyd_update({"a": honest}, centres)
    inflated = {**honest, "counts": np.asarray(honest["counts"]) * 10, "sums": np.asarray(honest["sums"]) * 10}
    with pytest.raises(ProtocolError, match="more patients"):
        lloyd_update({"a": inflated}, centres)
