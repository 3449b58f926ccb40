"""Whole-volume prediction by sliding windows, with nnU-Net's test-time mirroring (the mean of the predictions of
the volume flipped along every subset of its three axes), and the post-processing every use of a prediction
shares: keep the largest connected component.

An nnU-Net plan is predicted by nnU-Net's own predictor
(:func:`client.segmentation.nnunet_trainer.nnunet_probability`); a MONAI plan by
``monai.inferers.sliding_window_inference``."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from client.training.device import autocast


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a binary mask (an empty mask stays empty)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return np.asarray(mask).astype(np.uint8)
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == int(np.argmax(sizes)) + 1).astype(np.uint8)


def fill_slice_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes closed in 3-D and in every 2-D slice along each of the three axes (their union).

    A tumour outline is solid: the necrotic core belongs to the tumour, and it is what a model misses first
    (dark on contrast-enhanced T1, it looks like the background) while it still finds the enhancing rim. Such a
    core is enclosed on the slices a radiologist draws even where the rim has a gap in 3-D. A notch open to
    the outside on every slice is left as it is; a cavity enclosed on some slice (a cup seen across its
    axis) is filled.
    """
    solid = ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))
    out = solid.copy()
    for axis in range(solid.ndim):
        planes = np.moveaxis(solid, axis, 0)
        out |= np.moveaxis(np.stack([ndimage.binary_fill_holes(p) for p in planes]), 0, axis)
    return out


def keep_largest(probability: np.ndarray, fill_holes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The post-processing of a prediction: (the largest connected component above 0.5, with ``fill_holes`` its
    holes closed by :func:`fill_slice_holes`; the probability kept within one voxel of that mask and 0
    elsewhere, and 1 where hole filling added a voxel, so that scores and resampled maps agree with the mask)."""
    mask = largest_component(probability > 0.5).astype(bool)
    solid = fill_slice_holes(mask) if fill_holes else mask
    prob = np.where(ndimage.binary_dilation(solid), probability, 0.0)
    prob[solid & ~mask] = 1.0
    return solid.astype(np.uint8), prob.astype(np.float32)


def predict_probability(net: Any, image: np.ndarray, patch: Sequence[int], device: Any, overlap: float = 0.25,
                        amp: bool = False, sw_batch_size: int = 2, mirror: bool = False,
                        plan: Mapping[str, Any] | None = None,
                        spacing: Sequence[float] | None = None) -> np.ndarray:
    """Tumour probability (Z, Y, X) of one (C, Z, Y, X) image; Gaussian-weighted window blending. ``mirror``: the
    mean over the 8 flips of the volume (nnU-Net's ``use_mirroring``), each flipped back. With an nnU-Net
    ``plan`` (and the image's ``spacing``, z, y, x mm) nnU-Net's predictor does it all."""
    if plan is not None and plan.get("network") == "nnunet":
        from client.segmentation.nnunet_trainer import nnunet_probability

        if spacing is None:
            raise ValueError("nnU-Net's predictor needs the image's spacing")
        return nnunet_probability(net, image, spacing, plan, device, overlap=overlap, mirror=mirror)
    if mirror:
        flips = [axes for k in range(4) for axes in itertools.combinations((0, 1, 2), k)]
        total = np.zeros(image.shape[1:], dtype=np.float64)
        for axes in flips:
            flipped = np.ascontiguousarray(np.flip(image, axis=tuple(a + 1 for a in axes))) if axes else image
            one = predict_probability(net, flipped, patch, device, overlap, amp, sw_batch_size)
            total += np.flip(one, axis=axes) if axes else one
        return (total / len(flips)).astype(np.float32)
    import torch
    from monai.inferers import sliding_window_inference

    net.to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32)).to(device)
    with torch.no_grad(), autocast(device, amp):
        logits = sliding_window_inference(x, roi_size=list(patch), sw_batch_size=sw_batch_size, predictor=net,
                                          overlap=overlap, mode="gaussian")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the network returned {type(logits).__name__}, not one tensor (deep supervision is off)")
    prob = torch.softmax(logits.float(), dim=1)[0, 1]
    return prob.cpu().numpy().astype(np.float32)
