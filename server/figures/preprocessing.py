"""The preprocessing effect as a figure: per-sequence foreground intensity densities per site, before/after."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def plot_histograms(replies: Mapping[str, Mapping[str, object]], edges: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    out: Path) -> Path:
    """Per-sequence foreground intensity densities per site, before and after preprocessing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = list(edges)
    fig, axes = plt.subplots(len(seqs), 2, figsize=(10, 3.2 * len(seqs)), squeeze=False)
    for row, seq in enumerate(seqs):
        for col, (key, title) in enumerate((("raw_hist", "raw"), ("std_hist", "after preprocessing"))):
            e = edges[seq][col]
            centres = 0.5 * (e[1:] + e[:-1])
            ax = axes[row][col]
            for site, reply in sorted(replies.items()):
                h = np.asarray(reply[f"{seq}/{key}"], dtype=float)
                ax.plot(centres, h / max(h.sum() * np.diff(e).mean(), 1e-12), label=site)
            ax.set_title(f"{seq}: {title}")
            ax.set_xlabel("foreground intensity")
            ax.set_ylabel("density")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
