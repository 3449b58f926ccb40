"""FedAvg of the logistic model equals pooled gradient descent, and converges to the pooled optimum."""

from __future__ import annotations

import numpy as np
import pytest

from client.classifier.memory import CLASSIFIER_STEPS, SiteArrays, memory_sites
from common.classifier.protocol import ClassifierRun, run_classifier
from common.config import ClassifierConfig
from common.protocol import InMemoryQuery

SIZES = (30, 47, 23)
BETA = np.array([1.2, -0.7, 0.8, 0.0, 0.4])


def _sites(seed: int = 0) -> dict[str, SiteArrays]:
    rng = np.random.default_rng(seed)
    sites = {}
    for i, n in enumerate(SIZES):
        # sites differ in location and scale of the features and in size
        x = rng.normal(0.4 * i, 1.0 + 0.3 * i, (n, BETA.size))
        y = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-(x @ BETA - 0.3)))).astype(int)
        xt = rng.normal(0.0, 1.0, (10, BETA.size))
        sites[f"site-{i}"] = SiteArrays(x, y, xt, np.array([0, 1] * 5))
    return sites


def federated_classifier(sites: dict[str, SiteArrays], kind: str, cfg: ClassifierConfig,
                         keep_weights: bool = False) -> ClassifierRun:
    """The driver the ServerApp runs, over the sites in memory."""
    return run_classifier(InMemoryQuery(memory_sites(sites, cfg), CLASSIFIER_STEPS), kind, cfg,
                          keep_weights=keep_weights)


def _pooled_gd(x: np.ndarray, y: np.ndarray, lr: float, l2: float, steps: int) -> list[np.ndarray]:
    """Independent oracle: numpy gradient descent on the pooled mean BCE + (l2/2)||w||^2; [w..., b] per step."""
    w, b = np.zeros(x.shape[1]), 0.0
    out = [np.append(w, b)]
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        gw = x.T @ (p - y) / len(y) + l2 * w
        gb = float(np.mean(p - y))
        w, b = w - lr * gw, b - lr * gb
        out.append(np.append(w, b))
    return out


def test_fedavg_equals_pooled_gradient_descent_iterates() -> None:
    sites = _sites()
    cfg = ClassifierConfig(rounds=25, lr=1.0, l2=0.01, local_steps=1, bootstrap=0, shap=False)
    run = federated_classifier(sites, "logistic", cfg, keep_weights=True)
    x = np.vstack([a.x_train for a in sites.values()])
    y = np.concatenate([a.y_train for a in sites.values()])
    assert run.lr == cfg.lr  # below the curvature cap here
    oracle = _pooled_gd((x - run.mean) / run.scale, y, cfg.lr, cfg.l2, cfg.rounds)
    fed = [np.append(h["0.weight"][0], h["0.bias"][0]) for h in run.trajectory]
    assert len(fed) == len(oracle) == cfg.rounds + 1
    err = max(float(np.abs(f - o).max()) for f, o in zip(fed, oracle, strict=True))
    assert err < 1e-10, err
    assert float(np.abs(fed[-1]).max()) > 0.1  # it did move


def test_fedavg_converges_to_the_pooled_fit() -> None:
    from sklearn.linear_model import LogisticRegression

    sites = _sites(1)
    l2 = 0.01
    cfg = ClassifierConfig(rounds=150, lr=2.0, l2=l2, local_steps=1, bootstrap=0, shap=False)
    run = federated_classifier(sites, "logistic", cfg)
    x = np.vstack([a.x_train for a in sites.values()])
    y = np.concatenate([a.y_train for a in sites.values()])
    xs = (x - run.mean) / run.scale
    # the same objective: mean BCE + (l2/2)||w||^2  <=>  sklearn's 0.5||w||^2 + C * sum BCE with C = 1/(l2 N)
    ref = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-12, max_iter=10_000).fit(xs, y)
    assert np.abs(run.weights["0.weight"][0] - ref.coef_[0]).max() < 1e-3
    assert abs(run.weights["0.bias"][0] - ref.intercept_[0]) < 1e-3
    # the pooled scaling is the concatenated data's
    np.testing.assert_allclose(run.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(run.scale, x.std(axis=0), rtol=1e-12)


def test_several_local_steps_drift_from_pooled_fit_but_stay_close() -> None:
    """Documented trade-off: more local steps per round are no longer exactly pooled GD."""
    sites = _sites(2)
    one = federated_classifier(sites, "logistic", ClassifierConfig(rounds=20, lr=1.0, local_steps=1, bootstrap=0,
                                                                   shap=False))
    five = federated_classifier(sites, "logistic", ClassifierConfig(rounds=4, lr=1.0, local_steps=5, bootstrap=0,
                                                                    shap=False))
    diff = np.abs(one.weights["0.weight"] - five.weights["0.weight"]).max()
    assert 1e-8 < diff < 0.5


@pytest.mark.parametrize("n_bad", [1])
def test_a_site_with_non_finite_weights_is_rejected(n_bad: int) -> None:
    from common.classifier.training import fedavg_round

    g = {"w": np.zeros(3)}
    updates = {"a": ({"w": np.ones(3)}, 10.0), "b": ({"w": np.array([np.nan, 0, 0])}, 5.0),
               "c": ({"w": np.full(3, 3.0)}, 30.0)}
    new, rejected = fedavg_round(g, updates, max_norm=100.0)
    assert list(rejected) == ["b"] and len(rejected) == n_bad
    np.testing.assert_allclose(new["w"], np.full(3, (10 * 1 + 30 * 3) / 40))


def test_pooled_correlation_from_site_aggregates_and_step_size_cap() -> None:
    from common.classifier.training import pooled_correlation, site_crossproduct, step_size
    from common.pooled_moments import merge_moments, site_moments

    rng = np.random.default_rng(4)
    base = rng.normal(size=(60, 1))
    parts = [np.hstack([base[a:b] + 0.1 * rng.normal(size=(b - a, 1)) for _ in range(6)]) + i
             for i, (a, b) in enumerate(((0, 17), (17, 41), (41, 60)))]
    replies = {f"s{i}": {**site_moments(f"s{i}", x, 5), "cross": site_crossproduct(x)} for i, x in enumerate(parts)}
    corr = pooled_correlation(replies, merge_moments(replies))
    np.testing.assert_allclose(corr, np.corrcoef(np.vstack(parts), rowvar=False), atol=1e-12)
    # six nearly collinear features: curvature ~ 6/4, so a step of 2 is capped below 1/(1.5 + l2)
    lr = step_size(corr, 0.01, 2.0)
    assert lr == pytest.approx(1.0 / (0.25 * np.linalg.eigvalsh(corr).max() + 0.01)) and lr < 0.7
    assert step_size(np.eye(3), 0.0, 2.0) == 2.0


def test_a_site_claiming_1e9_examples_cannot_take_over_the_classifier() -> None:
    """A site inflating num-examples would own FedAvg; its count is bounded by the training cases it reported
    in the moments round, so its update is rejected and the model is the honest sites' FedAvg."""
    sites = _sites()
    cfg = ClassifierConfig(rounds=3, lr=1.0, l2=0.01, local_steps=1, bootstrap=0, shap=False)

    def inflate(direction: str, action: str, site: str, payload: dict) -> dict:
        if direction == "reply" and action == "train.classifier" and site == "site-2":
            payload["num-examples"] = 1e9
        return payload

    attacked = run_classifier(InMemoryQuery(memory_sites(sites, cfg), CLASSIFIER_STEPS, wire=inflate), "logistic",
                              cfg)
    assert all(h["rejected"].keys() == {"site-2"} for h in attacked.history)
    assert all("exceeds the cases" in h["rejected"]["site-2"] for h in attacked.history)
    # unguarded, the same reply takes the model over: FedAvg of the claimed counts is site-2's update
    from common.classifier.training import fedavg_round

    w0 = {k: np.zeros_like(v) for k, v in attacked.weights.items()}
    honest, evil = {k: np.ones_like(v) for k, v in w0.items()}, {k: np.full_like(v, 0.5) for k, v in w0.items()}
    taken, _ = fedavg_round(w0, {"site-0": (honest, 30.0), "site-2": (evil, 1e9)}, max_norm=1e6)
    assert all(np.allclose(taken[k], evil[k], atol=1e-6) for k in w0)
    guarded, rejected = fedavg_round(w0, {"site-0": (honest, 30.0), "site-2": (evil, 1e9)}, max_norm=1e6,
                                     bounds={"site-0": 30.0, "site-2": 23.0})
    assert set(rejected) == {"site-2"} and all(np.array_equal(guarded[k], honest[k]) for k in w0)
