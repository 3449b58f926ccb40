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


def keep_largest(probability: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The post-processing of a prediction: (the largest connected component above 0.5, the probability kept
    within one voxel of it and 0 elsewhere, so that scores and resampled maps agree with the mask)."""
    mask = largest_component(probability > 0.5)
    return mask, np.where(ndimage.binary_dilation(mask), probability, 0.0).astype(np.float32)


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
