"""PNG overlays of a prediction against the reference mask, for a human look (they stay where written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path | str, title: str = "") -> Path:
    """Three orthogonal slices through the tumour's centre: image in grey, reference in green, prediction in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(truth) > 0
    p = np.asarray(pred) > 0
    centre = [int(round(c)) for c in np.argwhere(t).mean(axis=0)] if t.any() else [s // 2 for s in t.shape]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for ax, axis in zip(axes, range(3), strict=True):
        sl: list[slice | int] = [slice(None)] * 3
        sl[axis] = centre[axis]
        ax.imshow(image[tuple(sl)], cmap="gray")
        if t[tuple(sl)].any():
            ax.contour(t[tuple(sl)].astype(float), levels=[0.5], colors="lime", linewidths=1.0)
        if p[tuple(sl)].any():
            ax.contour(p[tuple(sl)].astype(float), levels=[0.5], colors="red", linewidths=1.0)
        ax.set_axis_off()
        ax.set_title(["axial", "coronal", "sagittal"][axis], fontsize=8)
    fig.suptitle(f"{title}  (green: reference, red: prediction)", fontsize=9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return out
