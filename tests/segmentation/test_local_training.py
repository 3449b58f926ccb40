"""The site's local step: FedProx pulls towards the global model; an nnU-Net plan trains like a MONAI one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.config import StudyConfig
from common.segmentation.aggregation import update_norm
from tests.segmentation.conftest import tiny_segmentation

AGGREGATE = {"n_cases": 16, "spacing_median": [1.1, 1.1, 1.25], "shape_median": [32, 32, 32],
             "intensity": {s: {"mean": 500.0, "std": 100.0, "min": 0.0, "max": 1000.0,
                               "percentiles": {"p0.5": 10.0, "p50": 500.0, "p99.5": 990.0}}
                           for s in ("T2w", "CET1")}}


def test_fedprox_term_keeps_the_local_model_near_the_global_one(seg_sites: list[Path]) -> None:
    from client.segmentation.task import train_round
    from common.segmentation.networks import build_network, get_weights
    from common.segmentation.plan import make_plan
    from common.validation import load_site

    study = StudyConfig(segmentation=tiny_segmentation(steps_per_epoch=4, patch_size=[16, 16, 16], lr=0.01,
                                                       lr_schedule="constant"))
    plan = make_plan(AGGREGATE, study)
    start = get_weights(build_network(plan, seed=0))
    site = load_site(seg_sites[0])
    free = train_round(site, study, plan, start, 1, proximal_mu=0.0)
    prox = train_round(site, study, plan, start, 1, proximal_mu=50.0)
    assert free.metrics["num-examples"] == prox.metrics["num-examples"] == 5
    # Same seed, same batches: only the proximal term differs, and it shrinks the update.
    assert update_norm(prox.weights, start) < 0.8 * update_norm(free.weights, start)


def test_a_round_with_the_nnunet_network_changes_its_weights(seg_sites: list[Path]) -> None:
    from client.segmentation.task import evaluate_round, train_round
    from common.segmentation.networks import build_network, get_weights
    from common.segmentation.plan import make_plan
    from common.validation import load_site

    study = StudyConfig(segmentation=tiny_segmentation(network="nnunet", nnunet_base_features=4,
                                                       nnunet_max_features=16, patch_size=None, batch_size=None,
                                                       steps_per_epoch=2, overlays=0))
    plan = make_plan(AGGREGATE, study)
    assert plan["network"] == "nnunet" and plan["batch_size"] >= 2
    start = get_weights(build_network(plan, seed=0))
    site = load_site(seg_sites[1])
    out = train_round(site, study, plan, start, 1)
    assert set(out.weights) == set(start)
    assert all(np.isfinite(w).all() for w in out.weights.values())
    assert update_norm(out.weights, start) > 0
    summary = evaluate_round(site, study, plan, out.weights, 1)
    assert summary["num-examples"] == 3 and 0.0 <= summary["dsc-median"] <= 1.0


def test_test_time_mirroring_flips_each_prediction_back() -> None:
    """nnU-Net's mirroring: the mean of the 8 flipped predictions, each flipped back. A network whose logit is
    the image plus a small ramp along z (not flip-invariant) gives nearly its plain prediction; a flip not undone
    would move every voxel's value to its mirror position (differences of order 1)."""
    import torch

    from client.segmentation.inference import predict_probability

    class Ramp(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = torch.arange(x.shape[2], dtype=torch.float32).view(1, 1, -1, 1, 1)
            tumour = x[:, :1] + 0.01 * z
            return torch.cat([torch.zeros_like(tumour), tumour], 1)

    image = np.random.default_rng(0).normal(size=(2, 16, 12, 10)).astype(np.float32)
    plain = predict_probability(Ramp(), image, [16, 12, 10], "cpu")
    mirrored = predict_probability(Ramp(), image, [16, 12, 10], "cpu", mirror=True)
    assert mirrored.shape == plain.shape
    assert np.abs(mirrored - plain).max() < 0.05  # only the ramp's half of the flips differs (0.01 x 15 / 4)
    assert np.abs(np.flip(plain, 1) - plain).max() > 0.5  # what an un-flipped axis would have cost


def _ball(size: int, radius: float) -> np.ndarray:
    zz, yy, xx = np.indices((size,) * 3) - size // 2
    return zz ** 2 + yy ** 2 + xx ** 2 <= radius ** 2


def test_post_processing_closes_a_missed_necrotic_core_but_not_a_notch_open_to_the_outside() -> None:
    """A model that finds the enhancing rim but not the dark core: the rim is open at the top, so a 3-D fill
    cannot close it, but every axial slice through it is a closed ring. A slot cut from the surface to the
    centre is open on every slice along every axis and stays empty."""
    from client.segmentation.inference import fill_slice_holes, keep_largest

    c = 16
    core = _ball(33, 6)
    rim = _ball(33, 9) & ~core
    rim[c + 7:] = False  # the cap is missing: the cavity reaches the outside in 3-D
    from scipy import ndimage

    assert not (ndimage.binary_fill_holes(rim) & core).any()  # a 3-D fill alone leaves the whole core out
    filled = fill_slice_holes(rim)
    assert (filled & core).sum() == core.sum() and not (filled & ~_ball(33, 9)).any()

    notched = _ball(33, 9)
    slot = np.zeros_like(notched)
    slot[:, c - 1:c + 2, c:] = True
    notched &= ~slot
    assert not (fill_slice_holes(notched) & slot).any()

    probability = np.where(rim, 0.9, 0.1).astype(np.float32)
    mask, prob = keep_largest(probability)
    assert (mask.astype(bool) == filled).all()
    assert (prob[core] == 1.0).all() and ((prob > 0.5) == mask.astype(bool)).all()
    plain, _ = keep_largest(probability, fill_holes=False)
    assert (plain.astype(bool) == rim).all()
