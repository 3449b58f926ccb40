"""A plan from the server cannot make a site run code: the probe that works against nnU-Net's own
``get_network_from_plans`` is refused by the site's network builder, which builds the same network for an honest
plan."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from common.config import load_study_config
from common.errors import ProtocolError
from tests.segmentation.conftest import set_policy

FINGERPRINT = {"n_cases": 12, "spacing_median": [1.0, 1.0, 1.2], "shape_median": [32, 32, 32],
               "intensity": {s: {"mean": 500.0, "std": 100.0, "min": 0.0, "max": 1000.0,
                                 "percentiles": {"p0.5": 10.0, "p50": 500.0, "p99.5": 990.0}} for s in ("T2w", "CET1")}}


@pytest.fixture(scope="module")
def nnunet_plan() -> dict:
    from common.segmentation.plan import make_plan

    study = load_study_config(None)
    study = study.model_copy(update={"segmentation": study.segmentation.model_copy(update={"network": "nnunet"})})
    return make_plan(FINGERPRINT, study)


def _architecture(plan: dict) -> dict:
    return plan["nnunet"]["plans"]["configurations"]["3d_fullres"]["architecture"]


def _malicious(plan: dict, marker: Path) -> dict:
    """The probe: a 'network class' whose construction runs a shell command (MagicMock configured so that
    ``network.apply(network.initialize)``, which nnU-Net calls after building, is ``os.system("touch ...")``)."""
    bad = copy.deepcopy(plan)
    arch = _architecture(bad)
    arch["network_class_name"] = "unittest.mock.MagicMock"
    arch["arch_kwargs"] = {"initialize": f"touch {marker}", "apply.side_effect": "os.system"}
    arch["_kw_requires_import"] = ["apply.side_effect"]
    return bad


def test_the_probe_runs_code_through_nnunets_own_builder(nnunet_plan: dict, tmp_path: Path) -> None:
    """Unguarded, the plan's class name and imported keyword run a command in the site's process."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    marker = tmp_path / "ran-server-code"
    arch = _architecture(_malicious(nnunet_plan, marker))
    get_network_from_plans(arch["network_class_name"], dict(arch["arch_kwargs"]), tuple(arch["_kw_requires_import"]),
                           2, 2, allow_init=True, deep_supervision=False)
    assert marker.exists()  # the attack is real


def test_the_site_refuses_the_probe_without_running_it(nnunet_plan: dict, tmp_path: Path) -> None:
    from common.segmentation.networks import build_network

    marker = tmp_path / "ran-server-code"
    with pytest.raises(ProtocolError, match="allowed architectures"):
        build_network(_malicious(nnunet_plan, marker), seed=0)
    assert not marker.exists()


def test_the_site_step_refuses_the_probe_before_training(nnunet_plan: dict, tmp_path: Path,
                                                         writable_sites: list[Path]) -> None:
    """Through the segmentation site step (what a train message reaches): refused, and nothing ran."""
    from client.steps.segmentation import STEPS
    from common.protocol import round_trip
    from common.segmentation.protocol import TRAIN, model_request
    from common.validation import load_site

    marker = tmp_path / "ran-server-code"
    study = load_study_config(None, phases=("fingerprint", "segmentation"))  # raw images: only the plan is checked
    set_policy(writable_sites[0], min_cohort=2)  # enough cases to train: only the plan may be refused
    weights = {"w": np.zeros(1, dtype=np.float32)}
    request = round_trip(model_request(weights, 1, json.dumps(_malicious(nnunet_plan, marker))))
    with pytest.raises(ProtocolError):
        STEPS[TRAIN].run(load_site(writable_sites[0]), study, request)
    assert not marker.exists()


@pytest.mark.parametrize("field, value, rule", [
    ("conv_op", "os.system", "conv_op"),
    ("nonlin", "torch.nn.Module", "nonlin"),
    ("features_per_stage", [32, "64", 128, 256], "features_per_stage"),
    ("features_per_stage", [32, 64, 128, 10**9], "features_per_stage"),
    ("strides", [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 9]], "strides"),
    ("n_stages", True, "n_stages"),
    ("norm_op_kwargs", {"eps": 1e-5, "affine": True, "device": "cuda"}, "norm_op_kwargs"),
    ("extra_module", "builtins.exec", "arch_kwargs"),
])
def test_a_tampered_hyper_parameter_is_refused_by_name(nnunet_plan: dict, field: str, value: object,
                                                       rule: str) -> None:
    from common.segmentation.networks import build_network

    bad = copy.deepcopy(nnunet_plan)
    _architecture(bad)["arch_kwargs"][field] = value
    with pytest.raises(ProtocolError, match=rule):
        build_network(bad, seed=0)


@pytest.mark.parametrize("change", [{"network": "resnet"}, {"num_classes": 10**6}, {"sequences": "T2w"},
                                    {"monai": {"channels": [8, 16], "strides": [2], "num_res_units": "1"}}])
def test_a_tampered_monai_plan_is_refused(change: dict) -> None:
    from common.segmentation.networks import build_network

    plan = {"network": "monai", "sequences": ["T2w", "CET1"], "num_classes": 2,
            "monai": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}}
    build_network(plan, seed=0)  # the honest plan builds
    with pytest.raises(ProtocolError):
        build_network({**plan, **change}, seed=0)


def test_an_honest_plan_builds_exactly_nnunets_network(nnunet_plan: dict) -> None:
    """Same architecture, same parameter names and shapes, same initial values (same seed) as nnU-Net's builder."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from common.segmentation.networks import build_network, get_weights

    ours = get_weights(build_network(nnunet_plan, seed=7))
    arch = _architecture(nnunet_plan)
    torch.manual_seed(7)
    net = get_network_from_plans(arch["network_class_name"], copy.deepcopy(arch["arch_kwargs"]),
                                 tuple(arch["_kw_requires_import"]), 2, 2, allow_init=True, deep_supervision=False)
    theirs = get_weights(net)
    assert type(net).__name__ == "PlainConvUNet"
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
