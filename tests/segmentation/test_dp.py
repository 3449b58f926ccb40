"""DP-SGD: Opacus per-sample gradients against torch.func, epsilon across rounds, the site's budget stop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.config import StudyConfig
from common.errors import PolicyError
from tests.segmentation.conftest import set_policy, tiny_segmentation

FINGERPRINT = {"n_cases": 12, "spacing_median": [1.0, 1.0, 1.2], "shape_median": [32, 32, 32],
               "intensity": {s: {"mean": 500.0, "std": 100.0, "min": 0.0, "max": 1000.0,
                                 "percentiles": {"p0.5": 10.0, "p50": 500.0, "p99.5": 990.0}} for s in ("T2w", "CET1")}}


@pytest.mark.parametrize("network", ["monai", "nnunet"])
def test_opacus_per_sample_gradients_match_torch_func(network: str) -> None:
    import torch

    from client.segmentation.local import make_loss, one_hot
    from client.training.dp import max_relative_error, per_sample_grads_func, per_sample_grads_opacus
    from common.segmentation.networks import build_network
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
    from client.segmentation.task import train_round
    from client.training.dp import epsilon_of
    from common.segmentation.networks import build_network, get_weights
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


def test_the_site_step_keeps_the_accountant_in_its_ledger(dp_site: Path) -> None:
    from client.steps.segmentation import STEPS, ledger_path
    from common.protocol import round_trip, unpack_weights
    from common.segmentation.networks import build_network, get_weights
    from common.segmentation.plan import make_plan
    from common.segmentation.protocol import TRAIN, model_request
    from common.validation import load_site

    study = dp_study()
    plan = make_plan(FINGERPRINT, study)
    weights = get_weights(build_network(plan, seed=0))
    set_policy(dp_site, min_cohort=3, max_epsilon=100.0)
    step = STEPS[TRAIN]
    eps = []
    for rnd in (1, 2):
        site = load_site(dp_site)  # loaded afresh each round: the ledger survives a SuperNode restart
        request = round_trip(model_request(weights, rnd, json.dumps(plan)))
        reply = round_trip(step.run(site, study, request))  # what travels back: packed weights and scalars
        assert set(unpack_weights(reply)) == set(weights)
        assert reply["num-examples"] == 5
        eps.append(reply["epsilon"])
        state = json.loads(ledger_path(site, study).read_text())
        assert state["history"][-1][2] == 2 * rnd  # the steps of every round so far
    assert eps[0] < eps[1]
    set_policy(dp_site, min_cohort=3, max_epsilon=eps[1] * 1.01)
    with pytest.raises(PolicyError, match="max_epsilon"):
        step.run(load_site(dp_site), study, round_trip(model_request(weights, 3, json.dumps(plan))))


def test_an_exhausted_budget_comes_back_through_the_clientapp_as_a_logged_policy_refusal(dp_site: Path) -> None:
    """The one site handler: a ``train.segmentation`` message past ``max_epsilon`` is answered with a policy error
    reply naming the rule, and the refusal is written to the site's own log."""
    import time

    from flwr.app import Context, Message, Metadata, RecordDict

    from client.app import encode, handle
    from client.guard import REFUSAL_LOG
    from client.steps import SITE_STEPS
    from common.protocol import ERROR_POLICY, STUDY_KEY
    from common.segmentation.networks import build_network, get_weights
    from common.segmentation.plan import make_plan
    from common.segmentation.protocol import TRAIN, model_request

    study = dp_study()
    plan = make_plan(FINGERPRINT, study)
    weights = get_weights(build_network(plan, seed=0))
    context = Context(run_id=1, node_id=5, node_config={"data-path": str(dp_site)}, state=RecordDict(), run_config={})

    def message(rnd: int) -> Message:
        meta = Metadata(run_id=1, message_id=f"m{rnd}", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                        group_id=str(rnd), created_at=time.time(), ttl=600.0, message_type=TRAIN)
        body = {**model_request(weights, rnd, json.dumps(plan)), STUDY_KEY: json.dumps(study.model_dump(mode="json"))}
        return Message(metadata=meta, content=encode(body))

    set_policy(dp_site, min_cohort=3, max_epsilon=100.0)
    first = handle(SITE_STEPS[TRAIN], message(1), context)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    epsilon = float(first.content.config_records["config"]["epsilon"])
    assert epsilon > 0
    set_policy(dp_site, min_cohort=3, max_epsilon=epsilon * 1.01)
    refused = handle(SITE_STEPS[TRAIN], message(2), context)
    assert refused.has_error() and refused.error.code == ERROR_POLICY
    assert "policy rule 'max_epsilon'" in refused.error.reason
    log = [json.loads(line) for line in (dp_site / REFUSAL_LOG).read_text().splitlines()]
    assert [(e["rule"], e["message_type"]) for e in log] == [("max_epsilon", TRAIN)]
