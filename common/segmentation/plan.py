"""One segmentation plan for all sites, made on the server from the aggregated fingerprint.

The plan is a JSON-able dict that travels to every site with each round, so every site builds the same
network (:func:`common.segmentation.networks.build_network`) and samples the same patch size:

``network`` ("monai" | "nnunet"), ``sequences`` (input channels), ``num_classes`` (2: background, tumour),
``patch_size`` and ``batch_size``, ``target_spacing`` and ``median_shape`` (array order z, y, x),
``normalisation`` ("zscore": per case and channel, as nnU-Net does for MRI), and the network's settings under
``monai`` or ``nnunet`` (the full nnU-Net plans).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.config import StudyConfig
from common.errors import ConfigError

PLAN_FORMAT = "fedbiopsy-segplan/1"
NNUNET_TRAINER = "nnUNetTrainer"
FEDBIOPSY_LOOP = "fedbiopsy"


def local_trainer(plan: Mapping[str, Any], study: StudyConfig) -> str:
    """What does a site's local steps: nnU-Net's own ``nnUNetTrainer`` for an nnU-Net plan with ``nnunet_trainer``
    on, unless the study uses DP or FedProx (per-patient clipping and noise, and the proximal term, need
    fedbiopsy's loop, which trains the same network); else fedbiopsy's loop."""
    cfg = study.segmentation
    if plan.get("network") == "nnunet" and cfg.nnunet_trainer and not cfg.dp.enabled and cfg.strategy != "fedprox":
        return NNUNET_TRAINER
    return FEDBIOPSY_LOOP


def _monai_patch(median_shape: list[float], levels: int, requested: tuple[int, int, int] | None) -> list[int]:
    """The requested patch, or the median shape rounded down to a multiple of 2**levels (at most 128)."""
    unit = 2 ** levels
    if requested is not None:
        if any(int(p) % unit for p in requested):
            raise ConfigError("study config", f"segmentation.patch_size {list(requested)} is not divisible by "
                              f"{unit} (2 ** {levels} downsamplings of monai_channels)",
                              f"use multiples of {unit}, or fewer monai_channels")
        return [int(p) for p in requested]
    return [max(unit, min(128, int(s) // unit * unit)) for s in median_shape]


def make_plan(fingerprint: Mapping[str, Any], study: StudyConfig,
              grid_spacing: Sequence[float] | None = None) -> dict:
    """The plan for ``study`` from the fingerprint phase's aggregated output.

    ``grid_spacing`` (x, y, z mm): the grid the sites' images are on (the preprocessing plan's target spacing,
    when the study preprocesses); the median shape is rescaled onto it and it is the plan's ``target_spacing``
    (nnU-Net plans its network for it). None: the fingerprint's median spacing (raw images).
    """
    cfg = study.segmentation
    for key in ("n_cases", "spacing_median", "shape_median", "intensity"):
        if key not in fingerprint:
            raise ConfigError("fingerprint phase output", f"lacks {key!r}",
                              "run the fingerprint phase of this fedbiopsy version before segmentation")
    # The fingerprint holds SimpleITK (x, y, z) order; arrays and nnU-Net use (z, y, x).
    spacing_zyx = [float(s) for s in reversed(fingerprint["spacing_median"])]
    shape_zyx = [float(s) for s in reversed(fingerprint["shape_median"])]
    if grid_spacing is not None:
        grid_zyx = [float(s) for s in reversed(list(grid_spacing))]
        if len(grid_zyx) != 3 or any(not g > 0 for g in grid_zyx):
            raise ConfigError("preprocessing plan", f"target spacing {list(grid_spacing)} is not 3 positive "
                              "spacings", "rebuild the plan with the preprocessing phase")
        shape_zyx = [n * s / g for n, s, g in zip(shape_zyx, spacing_zyx, grid_zyx, strict=True)]
        spacing_zyx = grid_zyx
    plan: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "network": cfg.network,
        "sequences": list(study.intensity_sequences),
        "num_classes": 2,
        "target_spacing": spacing_zyx,
        "median_shape": shape_zyx,
        "normalisation": "zscore",
        "n_cases": int(fingerprint["n_cases"]),
    }
    if cfg.network == "nnunet":
        from common.segmentation.nnunet_adapter import CONFIGURATION, plan_nnunet, synthetic_fingerprint

        fp = synthetic_fingerprint(int(fingerprint["n_cases"]), spacing_zyx, shape_zyx, fingerprint["intensity"],
                                   study.intensity_sequences)
        plans = plan_nnunet(fp, study.intensity_sequences, int(fingerprint["n_cases"]), cfg.nnunet_base_features,
                            cfg.nnunet_max_features, cfg.nnunet_gpu_memory_gb)
        conf = plans["configurations"][CONFIGURATION]
        plan["nnunet"] = {"plans": plans, "configuration": CONFIGURATION}
        plan["patch_size"] = [int(p) for p in (cfg.patch_size or conf["patch_size"])]
        plan["batch_size"] = int(cfg.batch_size or conf["batch_size"])
        if grid_spacing is None:  # raw images: nnU-Net's own choice (the sites' native grids differ anyway)
            plan["target_spacing"] = [float(s) for s in conf["spacing"]]
    else:
        levels = len(cfg.monai_channels) - 1
        plan["monai"] = {"channels": list(cfg.monai_channels), "strides": [2] * levels,
                         "num_res_units": cfg.monai_res_units}
        plan["patch_size"] = _monai_patch(shape_zyx, levels, cfg.patch_size)
        plan["batch_size"] = int(cfg.batch_size or 2)
    return plan
