"""One plan for all sites: nnU-Net's planner on the aggregated fingerprint; identical networks everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import StudyConfig
from common.errors import ConfigError
from common.segmentation.plan import make_plan

INTENSITY = {s: {"mean": 500.0, "std": 100.0, "min": 0.0, "max": 1000.0,
                 "percentiles": {"p0.5": 10.0, "p50": 500.0, "p99.5": 990.0}} for s in ("T2w", "CET1")}
AGGREGATE = {"n_cases": 36, "spacing_median": [1.1, 1.1, 1.25], "shape_median": [64, 64, 64], "intensity": INTENSITY}
TINY_NNUNET = {"network": "nnunet", "nnunet_base_features": 8, "nnunet_max_features": 64, "patch_size": None,
               "batch_size": None}


def test_nnunet_plan_from_the_aggregate_matches_planning_on_pooled_cases() -> None:
    from common.segmentation.nnunet_adapter import CONFIGURATION, plan_nnunet, synthetic_fingerprint

    plan = make_plan(AGGREGATE, StudyConfig(segmentation=TINY_NNUNET))
    conf = plan["nnunet"]["plans"]["configurations"][CONFIGURATION]
    # What the sites get: no per-case values, nnU-Net's 3d_fullres choices, patched for DP.
    fp = synthetic_fingerprint(36, [1.25, 1.1, 1.1], [64, 64, 64], INTENSITY, ("T2w", "CET1"))
    assert all(s == [1.25, 1.1, 1.1] for s in fp["spacings"])
    assert plan["patch_size"] == conf["patch_size"] and plan["batch_size"] == conf["batch_size"]
    assert conf["architecture"]["arch_kwargs"]["features_per_stage"][0] == 8
    assert conf["architecture"]["arch_kwargs"]["nonlin_kwargs"]["inplace"] is False and conf["batch_dice"] is False
    assert plan["target_spacing"] == pytest.approx([1.25, 1.1, 1.1])
    # The same planner on a pooled per-case fingerprint with these medians plans the same network.
    spacings = [[1.25, 1.1, 1.1]] * 12 + [[1.0, 1.0, 1.0]] * 12 + [[1.5, 1.25, 1.25]] * 12
    shapes = [[64, 64, 64]] * 12 + [[56, 60, 60]] * 12 + [[72, 70, 70]] * 12
    pooled = dict(fp, spacings=spacings, shapes_after_crop=shapes)
    assert np.median(spacings, axis=0).tolist() == pytest.approx([1.25, 1.1, 1.1])
    direct = plan_nnunet(pooled, ("T2w", "CET1"), 36, 8, 64)["configurations"][CONFIGURATION]
    for key in ("patch_size", "spacing", "batch_size", "architecture"):
        assert direct[key] == conf[key], key


@pytest.mark.parametrize("seg", [TINY_NNUNET, {"network": "monai"}])
def test_every_site_builds_the_same_network_and_only_parameters_travel(seg: dict) -> None:
    from common.segmentation.networks import build_network, get_weights, set_weights

    plan = make_plan(AGGREGATE, StudyConfig(segmentation=seg))
    server, site = build_network(plan, seed=1), build_network(plan, seed=2)
    w_server, w_site = get_weights(server), get_weights(site)
    assert {k: v.shape for k, v in w_server.items()} == {k: v.shape for k, v in w_site.items()}
    set_weights(site, w_server)
    assert all(np.array_equal(get_weights(site)[k], w_server[k]) for k in w_server)
    state = site.state_dict()
    if seg["network"] == "nnunet":
        # nnU-Net's state_dict repeats the encoder (decoder.encoder.*, all_modules.*); parameters do not.
        assert len(state) > 2 * len(w_server)
        assert not any(k.startswith("decoder.encoder.") for k in w_server)
    assert sum(v.size for v in w_server.values()) == sum(p.numel() for p in site.parameters())


def test_monai_patch_must_fit_the_downsampling() -> None:
    with pytest.raises(ConfigError, match="divisible by 8"):
        make_plan(AGGREGATE, StudyConfig(segmentation={"network": "monai", "patch_size": [20, 20, 20]}))
