"""Opacus DP-SGD of the feature classifiers: per-site epsilon accounting across rounds, and the budget refusal."""

from __future__ import annotations

import numpy as np
import pytest

from client.classifier.memory import CLASSIFIER_STEPS, SiteArrays, memory_sites
from client.classifier.site import site_train
from client.training.dp import epsilon_of
from common.classifier.models import build_feature_model, model_weights
from common.classifier.protocol import run_classifier
from common.config import ClassifierConfig, ClassifierDPConfig
from common.errors import PolicyError
from common.protocol import InMemoryQuery


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    return x, (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)


def test_dp_rounds_spend_epsilon_per_site_as_the_accountant_says() -> None:
    dp = ClassifierDPConfig(enabled=True, noise_multiplier=1.2, batch_size=8, max_grad_norm=1.0, delta=1e-5)
    cfg = ClassifierConfig(models=("mlp",), rounds=3, local_steps=4, lr=0.3, mlp_hidden=6, bootstrap=10, dp=dp,
                           shap_nsamples=32)
    sites = {}
    for i, n in enumerate((40, 24)):
        x, y = _data(n, i)
        xt, yt = _data(10, 10 + i)
        sites[f"s{i}"] = SiteArrays(x, y, xt, yt)
    run = run_classifier(InMemoryQuery(memory_sites(sites, cfg), CLASSIFIER_STEPS), "mlp", cfg)
    eps = run.epsilon
    # each site's epsilon is the accountant's for its own sampling rate over 3 rounds x 4 steps
    for site, n in (("s0", 40), ("s1", 24)):
        expected = epsilon_of("rdp", [[1.2, 8 / n, 1]] * 12, 1e-5)
        assert eps[site] == pytest.approx(expected, rel=1e-9)
    assert eps["s1"] > eps["s0"] > 0  # the smaller site samples a larger share of its patients per step
    assert np.isfinite(run.summary["pooled"]["auc"])


def test_a_round_past_the_site_budget_is_refused() -> None:
    x, y = _data(20, 0)
    dp = ClassifierDPConfig(enabled=True, noise_multiplier=0.8, batch_size=10)
    cfg = ClassifierConfig(rounds=50, local_steps=20, dp=dp)
    weights = model_weights(build_feature_model("logistic", 4))
    with pytest.raises(PolicyError, match="max_epsilon"):
        site_train("s0", "logistic", weights, x, y, cfg, server_round=1, min_cohort=5, max_epsilon=1.0,
                   study_hash="h")


def test_dp_state_carries_the_ledger_between_rounds() -> None:
    x, y = _data(30, 1)
    dp = ClassifierDPConfig(enabled=True, noise_multiplier=1.0, batch_size=6)
    cfg = ClassifierConfig(rounds=2, local_steps=3, dp=dp)
    weights = model_weights(build_feature_model("logistic", 4))
    first = site_train("s0", "logistic", weights, x, y, cfg, server_round=1, min_cohort=5, study_hash="h")
    second = site_train("s0", "logistic", first.weights, x, y, cfg, server_round=2, min_cohort=5,
                        dp_state=first.dp_state, study_hash="h")
    assert sum(h[2] for h in first.dp_state["history"]) == 3
    assert sum(h[2] for h in second.dp_state["history"]) == 6  # the ledger went on, not restarted
    assert second.metrics["epsilon"] > first.metrics["epsilon"] > 0
    assert second.metrics["epsilon"] == pytest.approx(epsilon_of("rdp", [[1.0, 0.2, 1]] * 6, dp.delta), rel=1e-9)


def test_one_ledger_composes_every_model_of_the_study() -> None:
    """Two models on the same patients: the second round starts from the first model's spending."""
    x, y = _data(30, 2)
    dp = ClassifierDPConfig(enabled=True, noise_multiplier=1.0, batch_size=6)
    cfg = ClassifierConfig(rounds=1, local_steps=3, mlp_hidden=4, dp=dp)
    logistic = site_train("s0", "logistic", model_weights(build_feature_model("logistic", 4)), x, y, cfg,
                          server_round=1, min_cohort=5, study_hash="h")
    mlp = site_train("s0", "mlp", model_weights(build_feature_model("mlp", 4, hidden=4)), x, y, cfg, server_round=1,
                     min_cohort=5, dp_state=logistic.dp_state, study_hash="h")
    assert mlp.metrics["epsilon"] == pytest.approx(epsilon_of("rdp", [[1.0, 0.2, 6]], dp.delta), rel=1e-9)
    assert mlp.metrics["epsilon"] > logistic.metrics["epsilon"]
