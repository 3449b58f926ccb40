"""The one place that talks to nnU-Net v2: plan from an aggregated fingerprint, build a network from plans.

nnU-Net is configured by environment variables and reads its inputs from folders. Here those variables are set
only for the duration of a call (:func:`nnunet_env`), pointing at a throw-away folder holding a synthetic
``dataset.json`` and ``dataset_fingerprint.json`` made from the *aggregated* fingerprint (no per-case values:
every synthetic case carries the federation's median spacing and shape). nnU-Net's own ExperimentPlanner then
plans exactly as it would on a pooled dataset with those medians, so every site builds the same network.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ProtocolError

log = logging.getLogger(__name__)
DATASET_NAME = "Dataset999_FedBiopsy"
CONFIGURATION = "3d_fullres"
PLANS_NAME = "nnUNetPlansFedBiopsy"
_ENV_KEYS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_def_n_proc",
             "nnUNet_compile", "nnUNet_wandb_enabled")


@contextlib.contextmanager
def nnunet_env(root: Path, da_processes: int = 1) -> Iterator[None]:
    """nnU-Net's environment variables pointing under ``root``, restored on exit: no compilation, no W&B logger,
    ``da_processes`` data-augmentation workers (0: augmentation in the calling thread)."""
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    os.environ.pop("nnUNet_wandb_enabled", None)
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                      nnUNet_results=str(root / "results"), nnUNet_n_proc_DA=str(int(da_processes)),
                      nnUNet_def_n_proc="1", nnUNet_compile="false")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def synthetic_fingerprint(n_cases: int, spacing_zyx: Sequence[float], shape_zyx: Sequence[float],
                          intensity: Mapping[str, Mapping[str, Any]], sequences: Sequence[str]) -> dict:
    """An nnU-Net ``dataset_fingerprint.json`` built from federation-wide aggregates only."""
    props = {}
    for i, seq in enumerate(sequences):
        st = intensity.get(seq, {})
        pct = st.get("percentiles", {})
        props[str(i)] = {
            "mean": float(st.get("mean", 0.0)), "median": float(pct.get("p50", st.get("mean", 0.0))),
            "std": float(st.get("std", 1.0)), "min": float(st.get("min", 0.0)), "max": float(st.get("max", 1.0)),
            "percentile_99_5": float(pct.get("p99.5", st.get("max", 1.0))),
            "percentile_00_5": float(pct.get("p0.5", st.get("min", 0.0))),
        }
    shape = [int(round(s)) for s in shape_zyx]
    return {
        "spacings": [[float(s) for s in spacing_zyx]] * n_cases,
        "shapes_after_crop": [shape] * n_cases,
        "foreground_intensity_properties_per_channel": props,
        "median_relative_size_after_cropping": 1.0,
    }


def plan_nnunet(fingerprint: dict, sequences: Sequence[str], n_cases: int, base_features: int = 32,
                max_features: int = 320, gpu_memory_gb: float = 8.0) -> dict:
    """nnU-Net v2 plans (a JSON-able dict) from a synthetic fingerprint, run by nnU-Net's ExperimentPlanner.

    The returned plans are patched for federated and DP training: no in-place activations, no batch Dice.
    """
    import SimpleITK as sitk
    import torch

    with tempfile.TemporaryDirectory(prefix="fedbiopsy-nnunet-") as tmp:
        root = Path(tmp)
        raw = root / "raw" / DATASET_NAME
        pre = root / "preprocessed" / DATASET_NAME
        (raw / "imagesTr").mkdir(parents=True)
        (raw / "labelsTr").mkdir(parents=True)
        pre.mkdir(parents=True)
        # One tiny placeholder image, only so the planner can choose its image reader.
        dummy = sitk.GetImageFromArray(np.zeros((4, 4, 4), dtype=np.float32))
        images = []
        for i in range(len(sequences)):
            path = raw / "imagesTr" / f"case_{i:04d}.nii.gz"
            sitk.WriteImage(dummy, str(path))
            images.append(str(path))
        label = raw / "labelsTr" / "case.nii.gz"
        sitk.WriteImage(sitk.Cast(dummy, sitk.sitkUInt8), str(label))
        dataset_json = {
            "channel_names": {str(i): seq for i, seq in enumerate(sequences)},
            "labels": {"background": 0, "tumour": 1},
            "numTraining": int(n_cases),
            "file_ending": ".nii.gz",
            "dataset": {"case": {"images": images, "label": str(label)}},
        }
        from batchgenerators.utilities.file_and_folder_operations import save_json

        save_json(dataset_json, str(raw / "dataset.json"))
        save_json(fingerprint, str(pre / "dataset_fingerprint.json"))
        with nnunet_env(root):
            from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
                ExperimentPlanner,
            )

            class _FederatedPlanner(ExperimentPlanner):
                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    super().__init__(*args, **kwargs)
                    self.UNet_base_num_features = base_features
                    self.UNet_max_features_3d = max_features

            planner = _FederatedPlanner(DATASET_NAME, gpu_memory_target_in_gb=gpu_memory_gb,
                                        plans_name=PLANS_NAME)
            chatter = io.StringIO()
            threads = torch.get_num_threads()  # the planner's VRAM estimate resets torch's thread count
            try:
                with contextlib.redirect_stdout(chatter):
                    plans = planner.plan_experiment()
            finally:
                torch.set_num_threads(threads)
            log.debug("nnU-Net planner output:\n%s", chatter.getvalue())
    plans = json.loads(json.dumps(plans))  # plain JSON types (lists, not tuples): exactly what sites receive
    if CONFIGURATION not in plans["configurations"]:
        raise ValueError("nnU-Net planned no 3d_fullres configuration; the median shape is not 3D")
    conf = plans["configurations"][CONFIGURATION]
    conf["batch_dice"] = False
    conf["architecture"]["arch_kwargs"].setdefault("nonlin_kwargs", {})
    if conf["architecture"]["arch_kwargs"]["nonlin_kwargs"] is None:
        conf["architecture"]["arch_kwargs"]["nonlin_kwargs"] = {}
    conf["architecture"]["arch_kwargs"]["nonlin_kwargs"]["inplace"] = False
    plans["dataset_json"] = {k: v for k, v in dataset_json.items() if k != "dataset"}
    return plans


def _configuration(plans: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The plans' 3d_fullres configuration with an architecture entry, else a refusal."""
    configurations = plans.get("configurations") if isinstance(plans, Mapping) else None
    conf = configurations.get(CONFIGURATION) if isinstance(configurations, Mapping) else None
    if not isinstance(conf, Mapping) or not isinstance(conf.get("architecture"), Mapping):
        raise ProtocolError("(plan)", f"the nnU-Net plans have no {CONFIGURATION} architecture",
                            "use the plan the fingerprint phase of this fedbiopsy version makes")
    return conf


def build_nnunet_network(plans: Mapping[str, Any] | None, in_channels: int, num_classes: int,
                         deep_supervision: bool = False) -> Any:
    """The 3d_fullres network of ``plans``, built as nnU-Net's ``get_network_from_plans`` builds it, but only from
    an allowed architecture with checked hyper-parameters
    (:func:`common.segmentation.network_schema.nnunet_arch_kwargs`): nothing the plan names is imported.

    Without ``deep_supervision`` (evaluation, inference, the DP loop) the decoder's heads other than the last are
    frozen: they get no gradient, which Opacus would reject. nnU-Net's trainer builds it with deep supervision;
    the parameter names are the same either way, so the weights federate between the two.
    """
    from common.segmentation.network_schema import nnunet_arch_kwargs

    cls, kwargs = nnunet_arch_kwargs(_configuration(plans)["architecture"])
    net = cls(input_channels=in_channels, num_classes=num_classes, deep_supervision=deep_supervision, **kwargs)
    if hasattr(net, "initialize"):
        net.apply(net.initialize)  # nnU-Net's own initialisation, as get_network_from_plans(allow_init=True)
    seg_layers = getattr(getattr(net, "decoder", None), "seg_layers", None)
    if seg_layers is not None and not deep_supervision:
        for layer in list(seg_layers)[:-1]:
            for p in layer.parameters():
                p.requires_grad_(False)
    return net


def site_plans(plan: Mapping[str, Any]) -> dict:
    """The nnU-Net plans a site hands to nnU-Net's trainer and predictor, built by the site.

    nnU-Net resolves the preprocessor, normaliser, resampling functions, label manager and image reader by the
    names its plans give. Those names are the site's own here, never the server's: from the server's plan only
    checked numbers are taken (the architecture, checked by :func:`build_nnunet_network` when the network is
    built; patch and batch size; the grid). The plan's axis order must be nnU-Net's identity (a grid whose
    coarsest axis is z, or isotropic), which is what the planner gives for every grid this version makes.
    """
    from common.segmentation.network_schema import checked_int, io_channels, nnunet_arch_kwargs

    in_ch, _ = io_channels(plan)
    nn = plan.get("nnunet")
    server = nn.get("plans") if isinstance(nn, Mapping) else None
    conf = _configuration(server)
    nnunet_arch_kwargs(conf["architecture"])  # refuses anything not allowed
    for key in ("transpose_forward", "transpose_backward"):
        if server.get(key) != [0, 1, 2]:  # type: ignore[union-attr]
            raise ProtocolError("(plan)", f"nnU-Net {key} is not the identity (z, y, x)",
                                "use the plan the fingerprint phase of this fedbiopsy version makes")
    patch = plan.get("patch_size")
    spacing = plan.get("target_spacing")
    if not isinstance(patch, (list, tuple)) or len(patch) != 3 or not isinstance(spacing, (list, tuple)) \
            or len(spacing) != 3 or not all(isinstance(s, (int, float)) and 0 < s < 100 for s in spacing):
        raise ProtocolError("(plan)", "patch_size and target_spacing must be 3 numbers each",
                            "use the plan the fingerprint phase of this fedbiopsy version makes")
    patch = [checked_int("patch_size", p, 4, 512) for p in patch]
    batch = checked_int("batch_size", plan.get("batch_size"), 1, 64)
    spacing = [float(s) for s in spacing]
    data_kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    seg_kwargs = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    prob_kwargs = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    channel = {"mean": 0.0, "median": 0.0, "std": 1.0, "min": -10.0, "max": 10.0, "percentile_99_5": 5.0,
               "percentile_00_5": -5.0}
    return {
        "dataset_name": DATASET_NAME, "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": spacing, "original_median_shape_after_transp": patch,
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(i): dict(channel) for i in range(in_ch)},
        "configurations": {CONFIGURATION: {
            "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": batch, "patch_size": patch, "median_image_size_in_voxels": patch, "spacing": spacing,
            "normalization_schemes": ["ZScoreNormalization"] * in_ch, "use_mask_for_norm": [False] * in_ch,
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": data_kwargs,
            "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_seg_kwargs": seg_kwargs,
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": prob_kwargs,
            "batch_dice": False, "architecture": json.loads(json.dumps(conf["architecture"])),
        }},
    }


def site_dataset_json(plan: Mapping[str, Any], n_cases: int) -> dict:
    """nnU-Net's ``dataset.json`` for a site's cases: one channel per sequence, background and tumour."""
    from common.segmentation.network_schema import io_channels

    io_channels(plan)
    return {"channel_names": {str(i): str(s) for i, s in enumerate(plan["sequences"])},
            "labels": {"background": 0, "tumour": 1}, "numTraining": int(n_cases), "file_ending": ".nii.gz"}
