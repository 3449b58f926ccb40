"""``network: nnunet`` is nnU-Net: its own trainer does the local steps, its predictor scores, the site's plans only."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from common.config import StudyConfig
from common.errors import ProtocolError
from tests.segmentation.conftest import tiny_segmentation
from tests.segmentation.test_local_training import AGGREGATE


def _nnunet_study(**overrides: object) -> StudyConfig:
    seg = {"network": "nnunet", "nnunet_base_features": 4, "nnunet_max_features": 16, "patch_size": None,
           "batch_size": None, "steps_per_epoch": 3, "rounds": 3, "overlays": 0, "lr": 0.01, **overrides}
    return StudyConfig(segmentation=tiny_segmentation(**seg))


def test_nnunets_trainer_does_the_local_steps_with_deep_supervision_its_loss_and_poly_lr(
        seg_sites: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from client.segmentation import nnunet_trainer
    from client.segmentation.task import train_round
    from common.segmentation.aggregation import update_norm
    from common.segmentation.networks import build_network, get_weights
    from common.segmentation.plan import NNUNET_TRAINER, local_trainer, make_plan
    from common.validation import load_site

    study = _nnunet_study()
    plan = make_plan(AGGREGATE, study)
    assert local_trainer(plan, study) == NNUNET_TRAINER
    start = get_weights(build_network(plan, seed=0))
    seen: dict[str, list] = {"trainers": [], "outputs": [], "targets": [], "lr": [], "loss": []}
    original = nnunet_trainer.SiteTrainer.train_step

    def spy(self: nnUNetTrainer, batch: dict) -> dict:
        if not seen["trainers"]:
            self.network.register_forward_hook(lambda _m, _i, out: seen["outputs"].append(out))
        seen["trainers"].append(self)
        seen["targets"].append(batch["target"])
        seen["lr"].append(self.optimizer.param_groups[0]["lr"])
        out = original(self, batch)
        seen["loss"].append(float(out["loss"]))
        return out

    monkeypatch.setattr(nnunet_trainer.SiteTrainer, "train_step", spy)
    out = train_round(load_site(seg_sites[0]), study, plan, start, server_round=2)

    assert len(seen["trainers"]) == 3 == out.metrics["steps"]  # the round's local steps, each nnU-Net's train_step
    trainer = seen["trainers"][0]
    assert isinstance(trainer, nnUNetTrainer)
    assert type(trainer).train_step is spy and nnUNetTrainer.train_step is original  # nothing of it rewritten
    # Deep supervision: one output per decoder resolution, and the targets downsampled to match.
    stages = len(plan["nnunet"]["plans"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"])
    outputs = seen["outputs"][0]
    assert isinstance(outputs, (list, tuple)) and len(outputs) == stages - 1
    assert [o.shape[2:] for o in outputs] == [t.shape[2:] for t in seen["targets"][0]]
    assert outputs[0].shape[2:] == tuple(plan["patch_size"]) and outputs[1].shape[2] == plan["patch_size"][0] // 2
    # nnU-Net's loss: Dice + cross-entropy, weighted over the resolutions (halving, the coarsest unused).
    assert isinstance(trainer.loss, DeepSupervisionWrapper) and isinstance(trainer.loss.loss, DC_and_CE_loss)
    weights = np.array([1 / 2 ** i for i in range(stages - 1)])
    weights[-1] = 0
    np.testing.assert_allclose(trainer.loss.weight_factors, weights / weights.sum())
    # Its poly schedule, the round as the epoch: round 2 of 3 is epoch 1.
    assert seen["lr"] == [pytest.approx(0.01 * (1 - 1 / 3) ** 0.9)] * 3
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.99 and trainer.optimizer.param_groups[0]["nesterov"]
    assert np.isfinite(seen["loss"]).all() and out.metrics["train-loss"] == pytest.approx(np.mean(seen["loss"]))
    # Every weight travels back, and the round changed them: the half-resolution head too, which only deep
    # supervision trains (seg_layers run coarsest first; the coarsest has weight 0 in nnU-Net's loss).
    assert set(out.weights) == set(start) and update_norm(out.weights, start) > 0
    half = f"decoder.seg_layers.{stages - 3}.weight"
    assert half in start and not np.allclose(out.weights[half], start[half])


def test_with_dp_or_fedprox_the_same_network_trains_in_fedbiopsys_loop() -> None:
    from common.segmentation.plan import FEDBIOPSY_LOOP, NNUNET_TRAINER, local_trainer, make_plan

    plan = make_plan(AGGREGATE, _nnunet_study())
    assert local_trainer(plan, _nnunet_study()) == NNUNET_TRAINER
    assert local_trainer(plan, _nnunet_study(dp={"enabled": True})) == FEDBIOPSY_LOOP
    assert local_trainer(plan, _nnunet_study(strategy="fedprox")) == FEDBIOPSY_LOOP
    assert local_trainer(plan, _nnunet_study(nnunet_trainer=False)) == FEDBIOPSY_LOOP


def test_nnunets_predictor_is_the_network_on_the_case_in_its_own_axes() -> None:
    """One window covering the whole (already z-scored) case, no mirroring: nnU-Net's predictor must give the
    network's own softmax, voxel for voxel; an axis swapped, a class mixed up or a crop not undone would not.
    (Within 4 voxels of the window's edge nnU-Net's Gaussian weight underflows its half-precision accumulator.)"""
    import torch

    from client.segmentation.nnunet_trainer import nnunet_probability
    from common.segmentation.networks import build_network
    from common.segmentation.plan import make_plan

    study = _nnunet_study(patch_size=[32, 32, 32])
    plan = make_plan({**AGGREGATE, "spacing_median": [1.0, 1.0, 1.0]}, study)
    net = build_network(plan, seed=1).eval()
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 32, 32, 32)).astype(np.float32)
    image[:, 8:20, 4:14, 10:26] += 2.0  # not symmetric in any axis
    image = (image - image.mean(axis=(1, 2, 3), keepdims=True)) / image.std(axis=(1, 2, 3), keepdims=True)
    got = nnunet_probability(net, image, [1.0, 1.0, 1.0], plan, "cpu", overlap=0.0, mirror=False)
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(image[None])), dim=1)[0, 1].numpy()
    assert got.shape == (32, 32, 32)
    inner = (slice(4, -4),) * 3
    np.testing.assert_allclose(got[inner], want[inner], atol=2e-3)
    assert np.abs(got[inner] - want[inner]).mean() < 2e-4
    # On a case with another spacing the probability comes back on that case's grid.
    coarse = nnunet_probability(net, image[:, :, :, :24], [1.0, 1.0, 1.4], plan, "cpu", overlap=0.0, mirror=False)
    assert coarse.shape == (32, 32, 24)


def test_the_site_builds_nnunets_plans_itself_no_name_from_the_server_is_used() -> None:
    from common.segmentation.nnunet_adapter import site_plans
    from common.segmentation.plan import make_plan

    plan = make_plan(AGGREGATE, _nnunet_study())
    hostile = copy.deepcopy(plan)
    conf = hostile["nnunet"]["plans"]["configurations"]["3d_fullres"]
    conf.update(preprocessor_name="os.system", normalization_schemes=["EvilNormalization"] * 2,
                resampling_fn_data="subprocess.run", resampling_fn_data_kwargs={"shell": True})
    hostile["nnunet"]["plans"].update(label_manager="builtins.exec", image_reader_writer="pickle.loads")
    mine = site_plans(hostile)
    assert mine == site_plans(plan)  # the server's names changed nothing
    got = mine["configurations"]["3d_fullres"]
    assert got["preprocessor_name"] == "DefaultPreprocessor" and mine["label_manager"] == "LabelManager"
    assert got["normalization_schemes"] == ["ZScoreNormalization"] * 2
    assert got["resampling_fn_data"] == "resample_data_or_seg_to_shape" and "shell" not in str(got)
    assert got["patch_size"] == plan["patch_size"] and got["spacing"] == plan["target_spacing"]

    bad = copy.deepcopy(plan)
    bad["nnunet"]["plans"]["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    with pytest.raises(ProtocolError, match="network_class_name"):
        site_plans(bad)
    bad = copy.deepcopy(plan)
    bad["nnunet"]["plans"]["transpose_forward"] = [2, 1, 0]
    with pytest.raises(ProtocolError, match="transpose_forward"):
        site_plans(bad)
    bad = {**plan, "batch_size": 10**6}
    with pytest.raises(ProtocolError, match="batch_size"):
        site_plans(bad)
