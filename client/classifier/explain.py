"""Explanations computed at the site: SHAP of the feature models, Grad-CAM of the image model.

SHAP (package ``shap``): the background is one point, the pooled mean of the training features -- the zero
vector in the standardised space every site shares -- so that every site explains against the same reference
and the base value is the same everywhere. The logistic model is explained by ``shap.LinearExplainer`` in
logit space (exact: ``w * (x - mean)``), the MLP by ``shap.KernelExplainer`` on its probability. In both, the
SHAP values of a case sum to its model output minus the base value (SHAP's local accuracy), which the tests
check. Only per-feature sums of |SHAP| leave the site (:func:`common.classifier.explain.site_shap_summary`).

Grad-CAM (``monai.visualize.GradCAM``): for each crop, the map of the predicted class at ``layer``, upsampled to
the crop's shape and scaled to [0, 1] with its peak at 1 (not MONAI's default scaling, which flips the map).
What leaves the site: how often the map peaks inside the tumour, the share of the map's mass inside the
tumour, and the tumour's share of the crop (the chance level). Overlays are written to the site's
``derived/`` folder, never sent.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from client.training.overlays import save_planes

log = logging.getLogger(__name__)


def shap_values(kind: str, net: Any, x: np.ndarray, background: np.ndarray, nsamples: int = 256,
                seed: int = 0) -> tuple[np.ndarray, float, np.ndarray]:
    """(SHAP values (cases x features), base value, model outputs explained) of a feature model.

    ``kind`` "logistic": logit space (LinearExplainer); "mlp": probability (KernelExplainer).
    """
    with warnings.catch_warnings():  # shap 0.51 calls matplotlib colormap setters deprecated in matplotlib 3.10
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        import shap

    from common.classifier.models import feature_scores

    x = np.asarray(x, dtype=np.float64)
    bg = np.atleast_2d(np.asarray(background, dtype=np.float64))
    if kind == "logistic":
        lin = net[0]
        coef = lin.weight.detach().numpy()[0].astype(np.float64)
        intercept = float(lin.bias.detach().numpy()[0])
        explainer = shap.LinearExplainer((coef, intercept), bg)
        values = np.asarray(explainer.shap_values(x), dtype=np.float64)
        outputs = x @ coef + intercept
        return values, float(np.ravel(explainer.expected_value)[0]), outputs
    if kind == "mlp":
        def predict(data: np.ndarray) -> np.ndarray:
            return feature_scores(net, data)

        explainer = shap.KernelExplainer(predict, bg, seed=seed)
        values = np.asarray(explainer.shap_values(x, nsamples=nsamples, silent=True), dtype=np.float64)
        return values, float(np.ravel(explainer.expected_value)[0]), predict(x)
    raise ValueError(f"no SHAP explainer for model {kind!r}")


def unit_range(maps: np.ndarray) -> np.ndarray:
    """Each map (first axis: cases) scaled to [0, 1] with its largest value at 1; a constant map becomes 0."""
    m = np.asarray(maps, dtype=np.float64)
    if m.size == 0:
        return m
    axes = tuple(range(1, m.ndim))
    lo = m.min(axis=axes, keepdims=True)
    span = m.max(axis=axes, keepdims=True) - lo
    return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1.0), 0.0)


def _upsampled_only(maps: Any) -> Any:
    """Grad-CAM's post-processing: none (MONAI's default maps (min, max) to (1, 0), flipping the map)."""
    return maps


def grad_cam(net: Any, crops: np.ndarray, layer: str) -> np.ndarray:
    """Grad-CAM maps of the predicted class, (N, S, S, S) in [0, 1] with 1 at each map's most relevant voxel.

    The map at ``layer`` is upsampled (trilinear) to the crop's shape and scaled by :func:`unit_range`.
    MONAI's own post-processing is left out on purpose: it maps the largest value to 0 (documented, "this
    will flip magnitudes"), so that its peak is the *least* relevant voxel.
    """
    import torch
    from monai.visualize import GradCAM

    net.eval()
    cam = GradCAM(nn_module=net, target_layers=layer, postprocessing=_upsampled_only)
    maps = []
    for i in range(len(crops)):
        x = torch.as_tensor(np.asarray(crops[i:i + 1], dtype=np.float32))
        maps.append(cam(x).detach().numpy()[0, 0].astype(np.float64))
    return unit_range(np.stack(maps)) if maps else np.zeros((0,) + tuple(crops.shape[2:]))


def cam_in_tumour(maps: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per case: whether the map peaks inside the tumour, its mass share inside, and the tumour's volume share."""
    n = len(maps)
    flat = maps.reshape(n, -1)
    m = masks.reshape(n, -1) > 0
    peak = m[np.arange(n), flat.argmax(axis=1)]
    mass = flat.sum(axis=1)
    share = np.where(mass > 0, (flat * m).sum(axis=1) / np.where(mass > 0, mass, 1.0), 0.0)
    return {"peak_in_tumour": peak.astype(np.float64), "mass_in_tumour": share, "tumour_share": m.mean(axis=1)}


def save_gradcam_overlay(crop: np.ndarray, mask: np.ndarray, cam: np.ndarray, path: Path | str,
                         title: str = "") -> Path:
    """Three orthogonal slices through the tumour centre: first channel in grey, Grad-CAM as heat, tumour outline."""
    return save_planes(crop[0], mask, path, f"{title}  (Grad-CAM; white: tumour)", contours=((mask, "white"),),
                       heat=cam)
