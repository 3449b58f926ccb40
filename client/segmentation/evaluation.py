"""Evaluation of a network on held-out volumes: per-case metrics (they never leave the site as such)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.segmentation.data import Volume
from client.segmentation.inference import keep_largest, predict_probability
from client.training.overlays import save_overlay
from common.segmentation.metrics import case_metrics


@dataclass
class CaseResult:
    """One held-out case's metrics, and its prediction when kept."""

    patient_id: str
    metrics: dict[str, float]
    prediction: np.ndarray | None = None


def evaluate_volumes(net: Any, volumes: Sequence[Volume], patch: Sequence[int], device: Any, overlap: float = 0.25,
                     amp: bool = False, overlay_dir: Path | None = None, overlays: int = 0,
                     keep_predictions: bool = False, mirror: bool = False,
                     largest_only: bool = False, plan: Mapping[str, Any] | None = None,
                     fill_holes: bool = True) -> list[CaseResult]:
    """Predict each volume by sliding windows (``mirror``: test-time mirroring) and score it against its mask,
    the prediction post-processed as the inference phase does (``largest_only``:
    :func:`client.segmentation.inference.keep_largest`, ``fill_holes``); PNG overlays for the first few. An
    nnU-Net ``plan`` is predicted by nnU-Net's predictor."""
    results = []
    for i, vol in enumerate(volumes):
        if vol.label is None:
            raise ValueError(f"case {vol.patient_id} has no reference mask to evaluate against")
        prob = predict_probability(net, vol.image, patch, device, overlap=overlap, amp=amp, mirror=mirror,
                                   plan=plan, spacing=vol.spacing)
        pred = (prob >= 0.5).astype(np.uint8)
        if largest_only:
            pred, prob = keep_largest(prob, fill_holes)
        metrics = case_metrics(vol.label[0], pred, prob, vol.spacing)
        if overlay_dir is not None and i < overlays:
            save_overlay(vol.image[0], vol.label[0], pred, Path(overlay_dir) / f"{vol.patient_id}.png",
                         title=f"{vol.patient_id}: DSC {metrics['dsc']:.3f}")
        results.append(CaseResult(vol.patient_id, metrics, pred if keep_predictions else None))
    return results
