"""SHAP at the site: local accuracy, and the federated mean |SHAP| equals the pooled mean."""

from __future__ import annotations

import numpy as np
import pytest

from client.classifier.explain import shap_values
from common.classifier.explain import merge_shap, site_shap_summary
from common.classifier.models import build_feature_model, feature_scores
from common.errors import PolicyError


def _trained(kind: str, x: np.ndarray, y: np.ndarray) -> object:
    from client.classifier.local import LocalSettings, bce_loss, feature_batches, run_local_steps

    net = build_feature_model(kind, x.shape[1], hidden=8, seed=3)
    run_local_steps(net, feature_batches(x, y), bce_loss(), LocalSettings(steps=60, lr=0.5, l2=0.01))
    return net


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    y = (x[:, 0] - 0.8 * x[:, 2] + 0.3 * rng.normal(size=40) > 0).astype(int)
    return x, y


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_shap_values_sum_to_prediction_minus_base_value(kind: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = data
    net = _trained(kind, x, y)
    background = np.zeros((1, x.shape[1]))  # the pooled mean in standardised space
    values, base, outputs = shap_values(kind, net, x[:8], background, nsamples=64, seed=0)
    assert values.shape == (8, x.shape[1])
    np.testing.assert_allclose(values.sum(axis=1), outputs - base, atol=1e-6)
    # the base value is the model's output at the shared background
    if kind == "logistic":
        assert base == pytest.approx(float(net[0].bias.detach()[0]), abs=1e-9)
        # the model's informative features get the largest attributions, the noise feature none of note
        mean_abs = np.abs(values).mean(axis=0)
        assert mean_abs[0] > mean_abs[1] and mean_abs[2] > mean_abs[3]
    else:
        assert base == pytest.approx(float(feature_scores(net, background)[0]), abs=1e-9)
        np.testing.assert_allclose(outputs, feature_scores(net, x[:8]), atol=1e-12)


def test_federated_mean_abs_shap_equals_pooled_mean() -> None:
    rng = np.random.default_rng(1)
    per_site = {"a": rng.normal(size=(7, 3)), "b": rng.normal(size=(12, 3)), "c": rng.normal(size=(5, 3))}
    replies = {s: site_shap_summary(s, v, min_cohort=5) for s, v in per_site.items()}
    merged = merge_shap(replies, ["f0", "f1", "f2"])
    pooled = np.abs(np.vstack(list(per_site.values()))).mean(axis=0)
    got = dict(zip(merged["features"], merged["mean_abs_shap"], strict=True))
    for i, name in enumerate(["f0", "f1", "f2"]):
        assert got[name] == pytest.approx(pooled[i], abs=1e-12)
    assert merged["mean_abs_shap"] == sorted(merged["mean_abs_shap"], reverse=True)
    for reply in replies.values():  # per-feature sums only
        assert all(np.asarray(v).ndim <= 1 for v in reply.values())
    with pytest.raises(PolicyError, match="min_cohort"):
        site_shap_summary("d", rng.normal(size=(3, 3)), min_cohort=5)
