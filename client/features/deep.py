"""Deep features: a trained network's bottleneck (segmentation) or penultimate (classifier) activations, pooled
inside the tumour mask, as columns ``deep_0 ... deep_k``.

The activations are read with a forward hook (on the layer's input for ``penultimate``, the features that enter
the last linear layer; on the layer's output otherwise). A spatial activation map ``(1, C, d, h, w)`` is averaged
over the tumour with weights given by the mask's coverage of each activation cell (the mask area-downsampled to
the map's grid), so a tumour smaller than a cell still counts by its fraction. A non-spatial activation ``(1, C)``
(a classifier after global pooling) depends on the mask only through the input, so ``penultimate`` crops the input
to the tumour's bounding box plus ``crop_margin`` voxels first.

Known layouts: MONAI ``DynUNet`` (``.bottleneck``), MONAI ``UNet`` (its innermost block), nnU-Net's
``dynamic_network_architectures`` U-Nets (``.encoder.stages[-1]``), any network with a ``.bottleneck``; any network
whose last ``nn.Linear`` is its classifier head (MONAI ``DenseNet``, ``ResNet``, ...) for ``penultimate``. Other
layers by dotted module name (``"model.1.submodule"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from client.features.radiomics import ExtractionError
from common.errors import FedBiopsyError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from common.sitedata import Case

log = logging.getLogger(__name__)

DEFAULT_CROP_MARGIN = 8


def _unet_bottom(model: nn.Module) -> nn.Module | None:
    """The innermost block of a MONAI ``UNet`` (nested ``SkipConnection``s), or None."""
    from monai.networks.layers.simplelayers import SkipConnection

    node = getattr(model, "model", None)
    bottom = None
    while node is not None:
        skips = [m for m in node.children() if isinstance(m, SkipConnection)]
        if not skips:
            break
        bottom = skips[0].submodule
        node = bottom if any(isinstance(m, SkipConnection) for m in bottom.children()) else None
    return bottom


def find_layer(model: nn.Module, layer: str | nn.Module) -> tuple[nn.Module, bool]:
    """The module to hook and whether its *input* (True) or output (False) holds the features."""
    from torch import nn

    if isinstance(layer, nn.Module):
        return layer, False
    if layer == "bottleneck":
        candidate = getattr(model, "bottleneck", None)
        if isinstance(candidate, nn.Module):
            return candidate, False
        stages = getattr(getattr(model, "encoder", None), "stages", None)
        if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages):
            return stages[-1], False
        bottom = _unet_bottom(model)
        if bottom is not None:
            return bottom, False
        raise ExtractionError(f"no bottleneck found in {type(model).__name__}",
                              "pass the layer by its dotted module name (see model.named_modules())")
    if layer == "penultimate":
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ExtractionError(f"{type(model).__name__} has no linear classifier head",
                                  "pass the layer by its dotted module name (see model.named_modules())")
        return linears[-1], True
    try:
        return model.get_submodule(layer), False
    except AttributeError as exc:
        raise ExtractionError(f"{type(model).__name__} has no layer {layer!r}",
                              "pass 'bottleneck', 'penultimate' or a name from model.named_modules()") from exc


def _bbox_crop(image: np.ndarray, mask: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    return image[(slice(None), *sl)], mask[sl]


def _pad_to(image: np.ndarray, mask: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    if multiple <= 1:
        return image, mask
    pad = [(0, (-s) % multiple) for s in mask.shape]
    return np.pad(image, [(0, 0), *pad]), np.pad(mask, pad)


def pooled_activations(model: nn.Module, image: np.ndarray, mask: np.ndarray,
                       layer: str | nn.Module = "bottleneck", crop_margin: int | None = None,
                       pad_multiple: int = 16) -> np.ndarray:
    """The mask-pooled activation vector (float64, one value per channel of the layer).

    Parameters
    ----------
    model
        A torch network taking ``(1, C, z, y, x)``; left in the training/eval mode it was in.
    image
        ``(C, z, y, x)`` (or ``(z, y, x)`` for one channel), prepared as the network was trained.
    mask
        ``(z, y, x)``, tumour where non-zero.
    layer
        ``"bottleneck"``, ``"penultimate"``, a dotted module name or a module.
    crop_margin
        Crop to the tumour's bounding box plus this many voxels before the forward pass (default: no crop,
        except :data:`DEFAULT_CROP_MARGIN` for ``"penultimate"``).
    pad_multiple
        Zero-pad each spatial axis to a multiple of this (U-Nets need sizes divisible by their total stride).
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[None]
    mask = np.asarray(mask) != 0
    if image.ndim != 4 or image.shape[1:] != mask.shape:
        raise ExtractionError(f"image {image.shape} and mask {mask.shape} do not match",
                              "pass image (C, z, y, x) and mask (z, y, x) on the same grid")
    if not mask.any():
        raise ExtractionError("the tumour mask is empty", "deep features need at least one tumour voxel")
    if crop_margin is None and layer == "penultimate":
        crop_margin = DEFAULT_CROP_MARGIN
    if crop_margin is not None:
        image, mask = _bbox_crop(image, mask, crop_margin)
    image, mask = _pad_to(image, mask, pad_multiple)
    module, use_input = find_layer(model, layer)
    captured: list[torch.Tensor] = []

    def _hook(_m: nn.Module, inputs: tuple[Any, ...], output: Any = None) -> None:
        value = inputs[0] if use_input else output
        captured.append((value[0] if isinstance(value, (tuple, list)) else value).detach())

    handle = module.register_forward_pre_hook(_hook) if use_input else module.register_forward_hook(_hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(image))[None])
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise ExtractionError(f"layer {layer!r} was not reached by the forward pass", "pick another layer")
    act = captured[0].to(torch.float64)
    if act.ndim <= 2:
        if crop_margin is None:
            log.warning("layer %r has no spatial extent and the input was not cropped: the features do not "
                        "depend on the mask", layer)
        return act.reshape(-1).numpy()
    spatial = act.shape[2:]
    w = torch.from_numpy(mask.astype(np.float64))[None, None]
    if tuple(w.shape[2:]) != tuple(spatial):
        w = F.interpolate(w, size=tuple(spatial), mode="area")
    pooled = (act[0] * w[0]).sum(dim=tuple(range(1, act.ndim - 1))) / w.sum()
    return pooled.numpy()


def deep_features(model: nn.Module, image: np.ndarray, mask: np.ndarray, layer: str | nn.Module = "bottleneck",
                  prefix: str = "deep", **kwargs: Any) -> dict[str, float]:
    """:func:`pooled_activations` as ``{"deep_0": ..., "deep_k": ...}``."""
    vector = pooled_activations(model, image, mask, layer, **kwargs)
    return {f"{prefix}_{i}": float(v) for i, v in enumerate(vector)}


def zscore_channels(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score over the non-zero voxels (the default input preparation)."""
    out = np.empty_like(image, dtype=np.float32)
    for c, channel in enumerate(image):
        fg = channel[channel != 0]
        ref = fg if fg.size > 1 else channel.ravel()
        out[c] = (channel - ref.mean()) / (ref.std() + 1e-8)
    return out


def deep_feature_table(model: nn.Module, cases: Sequence[Case], sequences: Sequence[str],
                       layer: str | nn.Module = "bottleneck",
                       prepare: Callable[[np.ndarray], np.ndarray] = zscore_channels,
                       **kwargs: Any) -> tuple[pd.DataFrame, dict[str, str]]:
    """Deep features of every case with a mask (channels = ``sequences`` in order); failures with their reason.

    ``prepare`` maps the stacked ``(C, z, y, x)`` images to the network's input; it must match how the network
    was trained (the default z-scores each channel).
    """
    import SimpleITK as sitk

    from common.imageio import read_image

    rows: dict[str, dict[str, float]] = {}
    failures: dict[str, str] = {}
    for case in sorted(cases, key=lambda c: c.patient_id):
        if case.mask is None:
            failures[case.patient_id] = "no tumour mask"
            continue
        try:
            image = np.stack([sitk.GetArrayFromImage(read_image(case.images[s])) for s in sequences])
            mask = sitk.GetArrayFromImage(read_image(case.mask))
            rows[case.patient_id] = deep_features(model, prepare(image), mask, layer, **kwargs)
        except (FedBiopsyError, KeyError) as err:
            failures[case.patient_id] = str(err)
    frame = pd.DataFrame.from_dict(rows, orient="index").sort_index()
    frame.index.name = "patient_id"
    return frame, failures
