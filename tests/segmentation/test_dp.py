"""DP-SGD: Opacus per-sample gradients against torch.func, epsilon across rounds, the site's budget stop."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from common.config import StudyConfig
from common.errors import PolicyError
from tests.segmentation.conftest import set_policy, tiny_segmentation

FINGERPRINT = {"n_cases": 12, "spacing_median": [1.0, 1.0, 1.2], "shape_median": [32, 32, 32],
               "intensity": {s: {"mean": 500.0, "std": 100.0, "min": 0.0, "max": 1000.0,
                                 "percentiles": {"p0.5": 10.0, "p50": 500.0, "p99.5": 990.0}} for s in ("T2w", "CET1")}}


@pytest.mark.parametrize("network", ["monai", "nnunet"])
def test_opacus_per_sample_gradients_match_torch_func(network: str) -> None:
    import torch

    from client.training.dp import max_relative_error, per_sample_grads_func, per_sample_grads_opacus
    from client.training.local import make_loss, one_hot
    from client.training.networks import build_network
    from common.segmentation.plan import make_plan

    extra = {"nnunet_base_features": 4, "nnunet_max_features": 16} if network == "nnunet" else {}
    plan = make_plan(FINGERPRINT, StudyConfig(segmentation={"network": network, "patch_size": [16, 16, 16], **extra}))
    net = build_network(plan, seed=0)  # the network training actually uses (its loss too)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 16, 16, 16, generator=gen)
    y = one_hot((torch.rand(3, 1, 16, 16, 16, generator=gen) > 0.7).long(), 2)
    truth = per_sample_grads_func(net, make_loss(), x, y)
    got = per_sample_grads_opacus(net, make_loss(), x, y)
    assert set(got) == set(truth) and len(truth) > 20
    assert max_relative_error(got, truth) < 1e-3
    if network == "nnunet":
        # Regression pin: stock Opacus hooks each encoder conv once per path (4 here), inflating its gradients.
        stock = per_sample_grads_opacus(net, make_loss(), x, y, dedup=False)
        first = "encoder.stages.0.0.convs.0.conv.weight"
        assert float(stock[first].norm() / truth[first].norm()) == pytest.approx(4.0, rel=1e-3)


@pytest.fixture
def dp_site(tmp_path: Path, seg_sites: list[Path]) -> Path:
    dst = tmp_path / seg_sites[0].name
    shutil.copytree(seg_sites[0], dst)
    return dst


def dp_study() -> StudyConfig:
    seg = tiny_segmentation(rounds=3, steps_per_epoch=2, patch_size=[16, 16, 16], overlays=0,
                            dp={"enabled": True, "target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0})
    return StudyConfig(name="dp-test", segmentation=seg)


def test_epsilon_grows_with_rounds_and_the_site_stops_at_its_budget(dp_site: Path) -> None:
    from client.training.dp import epsilon_of
    from client.training.networks import build_network, get_weights
    from client.training.task import train_round
    from common.segmentation.plan import make_plan
    from common.validation import load_site

    study = dp_study()
    plan = make_plan(FINGERPRINT, study)
    weights = get_weights(build_network(plan, seed=0))
    set_policy(dp_site, min_cohort=3, max_epsilon=100.0)
    site = load_site(dp_site)
    state = None
    eps, sigmas = [], []
    for rnd in (1, 2):
        out = train_round(site, study, plan, weights, rnd, dp_state=state)
        state, weights = out.dp_state, out.weights
        eps.append(out.metrics["epsilon"])
        sigmas.append(out.metrics["noise-multiplier"])
        assert out.metrics["dp"] == 1.0 and all(np.isfinite(w).all() for w in weights.values())
    assert 0 < eps[0] < eps[1] < 8.0
    assert sigmas[0] == sigmas[1]  # sized once for the whole schedule
    assert state["history"] == [[sigmas[0], 2 / 5, 4]]  # 2 rounds x 2 steps at q = batch 2 / 5 patients
    full = epsilon_of("rdp", [[sigmas[0], 0.4, 6]], 1e-5)
    assert 7.0 < full <= 8.0 * 1.01  # the whole schedule spends (about) the study's target, never more

    set_policy(dp_site, min_cohort=3, max_epsilon=(eps[1] + full) / 2)
    with pytest.raises(PolicyError, match="max_epsilon") as refused:
        train_round(load_site(dp_site), study, plan, weights, 3, dp_state=state)
    assert "privacy budget exhausted" in str(refused.value) and f"{eps[1]:.3f}" in str(refused.value)


def _train_message(study: StudyConfig, plan: dict, weights: dict, rnd: int) -> Message:
    from client.app import STUDY_KEY
    from client.segmentation_handlers import PLAN_KEY

    meta = Metadata(run_id=1, message_id=f"m{rnd}", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                    group_id=str(rnd), created_at=time.time(), ttl=600.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                          "config": ConfigRecord({STUDY_KEY: json.dumps(study.model_dump(mode="json")),
                                                  PLAN_KEY: json.dumps(plan), "server-round": rnd})})
    return Message(metadata=meta, content=content)


def test_the_clientapp_keeps_the_accountant_in_the_node_state(dp_site: Path) -> None:
    from client.segmentation_handlers import DP_STATE_KEY, train_handler
    from client.training.networks import build_network, get_weights
    from common.segmentation.plan import make_plan

    study = dp_study()
    plan = make_plan(FINGERPRINT, study)
    weights = get_weights(build_network(plan, seed=0))
    set_policy(dp_site, min_cohort=3, max_epsilon=100.0)
    context = Context(run_id=1, node_id=5, node_config={"data-path": str(dp_site)}, state=RecordDict(), run_config={})
    eps = []
    for rnd in (1, 2):
        reply = train_handler(_train_message(study, plan, weights, rnd), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert len(reply.content.array_records) == 1 and len(reply.content.metric_records) == 1
        metrics = reply.content.metric_records["metrics"]
        assert metrics["num-examples"] == 5
        eps.append(metrics["epsilon"])
        state = json.loads(str(context.state.config_records[DP_STATE_KEY]["json"]))
        assert state["history"][-1][2] == 2 * rnd  # the steps of every round so far
    assert eps[0] < eps[1]
    set_policy(dp_site, min_cohort=3, max_epsilon=eps[1] * 1.01)
    refused = train_handler(_train_message(study, plan, weights, 3), context)
    assert refused.has_error() and "max_epsilon" in refused.error.reason
