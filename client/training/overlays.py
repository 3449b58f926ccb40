"""PNG overlays through a tumour, for a human look (they stay where written: at the site)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

PLANES = ("axial", "coronal", "sagittal")


def save_planes(image: np.ndarray, centre_mask: np.ndarray, path: Path | str, title: str,
                contours: Sequence[tuple[np.ndarray, str]] = (), heat: np.ndarray | None = None) -> Path:
    """Three orthogonal slices through ``centre_mask``'s centroid: ``image`` in grey, an optional heat map on
    [0, 1], and each (mask, colour) of ``contours`` outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.asarray(centre_mask) > 0
    centre = [int(round(x)) for x in np.argwhere(c).mean(axis=0)] if c.any() else [s // 2 for s in c.shape]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for ax, axis in zip(axes, range(3), strict=True):
        sl: list[slice | int] = [slice(None)] * 3
        sl[axis] = centre[axis]
        cut = tuple(sl)
        ax.imshow(image[cut], cmap="gray")
        if heat is not None:
            ax.imshow(heat[cut], cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
        for mask, colour in contours:
            m = np.asarray(mask) > 0
            if m[cut].any():
                ax.contour(m[cut].astype(float), levels=[0.5], colors=colour, linewidths=1.0)
        ax.set_axis_off()
        ax.set_title(PLANES[axis], fontsize=8)
    fig.suptitle(title, fontsize=9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return out


def save_overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path | str, title: str = "") -> Path:
    """Three orthogonal slices through the tumour's centre: image in grey, reference in green, prediction in red."""
    return save_planes(image, truth, path, f"{title}  (green: reference, red: prediction)",
                       contours=((truth, "lime"), (pred, "red")))
