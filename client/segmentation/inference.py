"""Whole-volume prediction by sliding windows (``monai.inferers.sliding_window_inference``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from client.training.device import autocast


def predict_probability(net: Any, image: np.ndarray, patch: Sequence[int], device: Any, overlap: float = 0.25,
                        amp: bool = False, sw_batch_size: int = 2) -> np.ndarray:
    """Tumour probability (Z, Y, X) of one (C, Z, Y, X) image; Gaussian-weighted window blending."""
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
