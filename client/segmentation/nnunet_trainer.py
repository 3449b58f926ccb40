"""nnU-Net v2's own trainer doing a site's local steps, and nnU-Net's predictor scoring a volume.

With ``segmentation.network: nnunet`` (and ``nnunet_trainer``, without DP) one federated round at a site is one
nnU-Net epoch of ``local_steps`` iterations run by :class:`SiteTrainer`, which *is* nnU-Net's ``nnUNetTrainer``:
its data loader (foreground oversampling, padding), its augmentation pipeline (rotation, scaling, noise, blur,
brightness, contrast, low resolution, gamma, mirroring), deep supervision with nnU-Net's Dice + cross-entropy
weighted over the resolutions, SGD with Nesterov momentum 0.99, gradient clipping at 12, and its poly learning
rate with the round as the epoch. Three things differ, each for the site's safety or its folders:

- the network is built from the checked architecture (:func:`common.segmentation.nnunet_adapter.
  build_nnunet_network`), never from a class the plan names;
- the plans it is given are the site's own (:func:`common.segmentation.nnunet_adapter.site_plans`): every name
  nnU-Net resolves (preprocessor, normaliser, resampling, label manager) is fixed by the site;
- its cases are the site's training cases, preprocessed by nnU-Net's ``DefaultPreprocessor`` (crop to the
  non-zero region, z-score, resampling onto the plan's spacing, foreground locations) into a throw-away folder
  in nnU-Net's format under the site's work folder, and its log goes to :mod:`logging`.

Prediction (:func:`nnunet_probability`) is nnU-Net's ``nnUNetPredictor``: the same preprocessing, Gaussian
sliding windows, mirroring over the three axes, and the logits brought back onto the case's own grid.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from client.segmentation.data import Volume
from common.segmentation.networks import get_weights, set_weights
from common.segmentation.nnunet_adapter import (
    CONFIGURATION,
    DATASET_NAME,
    build_nnunet_network,
    nnunet_env,
    site_dataset_json,
    site_plans,
)

log = logging.getLogger(__name__)
MIRROR_AXES = (0, 1, 2)


class SiteTrainer(nnUNetTrainer):
    """nnU-Net's trainer on the site's own cases, with the checked network and logging instead of prints."""

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: Any,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> Any:
        """The checked architecture of the site's plans (nnU-Net's would import the class its plans name)."""
        return build_nnunet_network(plans_manager.plans, num_input_channels, num_output_channels,
                                    deep_supervision=enable_deep_supervision)

    def _do_i_compile(self) -> bool:
        return False

    def print_to_log_file(self, *args: Any, also_print_to_console: bool = True, add_timestamp: bool = True) -> None:
        log.debug(" ".join(str(a) for a in args))

    def do_split(self) -> tuple[list[str], list[str]]:
        """Every case in the folder trains (the site's held-out cases are never written there)."""
        keys = sorted(nnUNetDatasetNumpy.get_identifiers(self.preprocessed_dataset_folder))
        return keys, keys[:1]


@dataclass(frozen=True)
class TrainerSettings:
    """One round of nnU-Net's trainer at a site: an epoch of ``steps`` iterations, epoch ``epoch`` of ``epochs``."""

    steps: int
    lr: float
    weight_decay: float
    epoch: int
    epochs: int
    foreground_ratio: float
    seed: int
    da_processes: int = 0

    @classmethod
    def for_round(cls, cfg: Any, epoch: int, seed: int) -> TrainerSettings:
        """The settings of epoch ``epoch`` (0-based round) of a study's ``segmentation`` config."""
        return cls(steps=cfg.local_steps, lr=cfg.lr, weight_decay=cfg.weight_decay, epoch=epoch, epochs=cfg.rounds,
                   foreground_ratio=cfg.foreground_ratio, seed=seed, da_processes=cfg.nnunet_da_processes)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """nnU-Net prints (device, citation, planner chatter): kept at debug level in the site's log."""
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            yield
    finally:
        if chatter.getvalue().strip():
            log.debug("nnU-Net: %s", chatter.getvalue().strip())


def _seed(seed: int) -> None:
    """nnU-Net's loader and augmentation draw from numpy's, Python's and torch's global generators."""
    np.random.seed(seed % (2**32))
    random.seed(seed)
    torch.manual_seed(seed)


def write_cases(volumes: Sequence[Volume], plans: Mapping[str, Any], dataset_json: Mapping[str, Any],
                folder: Path) -> list[str]:
    """Each training volume preprocessed by nnU-Net's ``DefaultPreprocessor`` and saved in nnU-Net's format
    (``case_XXXX.npz`` and its ``.pkl`` properties); the keys written."""
    pm = PlansManager(dict(plans))
    cm = pm.get_configuration(CONFIGURATION)
    pre = DefaultPreprocessor(verbose=False)
    keys = []
    for i, vol in enumerate(volumes):
        if vol.label is None:
            raise ValueError(f"case {vol.patient_id} has no mask and cannot be used for training")
        data, seg, props = pre.run_case_npy(vol.image, vol.label.astype(np.int16), {"spacing": list(vol.spacing)},
                                            pm, cm, dict(dataset_json))
        key = f"case_{i:04d}"
        nnUNetDatasetNumpy.save_case(data, seg, props, str(folder / key))
        keys.append(key)
    return keys


def _finish(loader: Any) -> None:
    """Stop a multi-process augmenter's workers (the single-threaded one has none)."""
    finish = getattr(loader, "_finish", None)
    if callable(finish):
        with _quiet():
            finish()


def train_with_nnunet(volumes: Sequence[Volume], plan: Mapping[str, Any], global_weights: Mapping[str, np.ndarray],
                      settings: TrainerSettings, device: Any, work: Path,
                      site_id: str = "(local)") -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One round: nnU-Net's trainer, started from ``global_weights``, runs ``settings.steps`` of its
    ``train_step`` on the site's training volumes; returns (the new weights, the mean loss and steps done)."""
    plans = site_plans(plan)
    dataset_json = site_dataset_json(plan, len(volumes))
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nnunet-", dir=work) as tmp, nnunet_env(Path(tmp), settings.da_processes):
        root = Path(tmp)
        folder = root / "preprocessed" / DATASET_NAME / plans["configurations"][CONFIGURATION]["data_identifier"]
        folder.mkdir(parents=True)
        write_cases(volumes, plans, dataset_json, folder)
        _seed(settings.seed)
        with _quiet():
            trainer = SiteTrainer(plans={**plans, "continue_training": False}, configuration=CONFIGURATION, fold=0,
                                  dataset_json=dataset_json, device=torch.device(device))
        trainer.initial_lr = settings.lr
        trainer.weight_decay = settings.weight_decay
        trainer.num_epochs = settings.epochs
        trainer.current_epoch = settings.epoch
        trainer.num_iterations_per_epoch = settings.steps
        trainer.oversample_foreground_percent = settings.foreground_ratio
        trainer.initialize()
        set_weights(trainer.network, global_weights, site_id)
        with _quiet():
            trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
        losses = []
        try:
            trainer.set_deep_supervision_enabled(True)
            trainer.on_train_epoch_start()
            for _ in range(settings.steps):
                losses.append(float(trainer.train_step(next(trainer.dataloader_train))["loss"]))
        finally:
            _finish(trainer.dataloader_train)
            _finish(trainer.dataloader_val)
        weights = get_weights(trainer.network)
    log.debug("nnU-Net epoch %d of %d: lr %.5f", settings.epoch, settings.epochs,
              trainer.optimizer.param_groups[0]["lr"])
    return weights, {"train-loss": float(np.mean(losses)) if losses else float("nan"), "steps": float(len(losses))}


def nnunet_probability(net: Any, image: np.ndarray, spacing: Sequence[float], plan: Mapping[str, Any], device: Any,
                       overlap: float = 0.5, mirror: bool = True) -> np.ndarray:
    """Tumour probability (Z, Y, X) of one (C, Z, Y, X) image on its own grid (``spacing`` z, y, x mm), by
    nnU-Net's predictor: its preprocessing, Gaussian sliding windows (step ``1 - overlap`` of the patch),
    ``mirror``: the mean over the 8 flips, and resampling back onto the image's grid."""
    plans = site_plans(plan)
    dataset_json = site_dataset_json(plan, 1)
    pm = PlansManager(plans)
    with _quiet():
        predictor = nnUNetPredictor(tile_step_size=max(0.05, 1.0 - float(overlap)), use_gaussian=True,
                                    use_mirroring=mirror, perform_everything_on_device=False,
                                    device=torch.device(device), verbose=False, verbose_preprocessing=False,
                                    allow_tqdm=False)
        predictor.manual_initialization(net, pm, pm.get_configuration(CONFIGURATION), [net.state_dict()],
                                        dataset_json, "nnUNetTrainer", MIRROR_AXES)
        _, prob = predictor.predict_single_npy_array(np.ascontiguousarray(image, dtype=np.float32),
                                                     {"spacing": [float(s) for s in spacing]}, None, None, True)
    return np.asarray(prob[1], dtype=np.float32)
