"""Kaplan-Meier figure a clinician expects: one curve per group with its confidence band, censoring ticks,
the log-rank result, and the numbers at risk under the time axis. PNG, matplotlib (no pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd


def at_risk_at(km: pd.DataFrame, times: np.ndarray) -> list[int]:
    """Patients at risk just before each of ``times`` (from a :func:`common.survival.kaplan_meier` frame)."""
    t = km.index.to_numpy(dtype=np.float64)
    n = float(km["at_risk"].iloc[0])
    removed = (km["observed"] + km["censored"]).to_numpy()
    return [int(round(n - removed[t < x].sum())) for x in times]


def plot_kaplan_meier(curves: Mapping[str, pd.DataFrame], path: Path | str, title: str = "Overall survival",
                      subtitle: str = "", time_unit: str = "days", alpha: float = 0.05) -> Path:
    """Write the KM curves (``label -> kaplan_meier frame``) with bands and an at-risk table to ``path``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = list(curves)
    fig = Figure(figsize=(8.0, 5.2 + 0.28 * len(labels)), dpi=120)
    grid = fig.add_gridspec(2, 1, height_ratios=[5.0, 0.6 + 0.3 * len(labels)], hspace=0.35)
    ax = fig.add_subplot(grid[0])
    colours = [f"C{i}" for i in range(len(labels))]
    t_max = max(float(km.index.max()) for km in curves.values()) or 1.0
    for label, colour in zip(labels, colours, strict=True):
        km = curves[label]
        t = km.index.to_numpy(dtype=np.float64)
        n, events = int(km["at_risk"].iloc[0]), int(km["observed"].sum())
        ax.step(t, km["survival"], where="post", color=colour, lw=2, label=f"{label} (n={n}, events={events})")
        ax.fill_between(t, km["ci_lower"], km["ci_upper"], step="post", color=colour, alpha=0.18, lw=0)
        cens = km["censored"].to_numpy() > 0
        ax.plot(t[cens], km["survival"].to_numpy()[cens], "|", color=colour, ms=9, mew=1.5)
    ax.set_xlim(-0.04 * t_max, t_max * 1.03)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Survival probability")
    ax.set_xlabel(f"Time ({time_unit})")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=7, integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9, title=f"shaded: {100 * (1 - alpha):g}% CI", title_fontsize=8)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    ticks = np.array([x for x in ax.get_xticks() if 0 <= x <= t_max * 1.03])
    table = fig.add_subplot(grid[1], sharex=ax)
    table.set_ylim(-0.5, len(labels) - 0.5)
    table.set_yticks(range(len(labels)), labels=list(reversed(labels)), fontsize=9)
    for row, (label, colour) in enumerate(zip(reversed(labels), reversed(colours), strict=True)):
        table.get_yticklabels()[row].set_color(colour)
        for x, count in zip(ticks, at_risk_at(curves[label], ticks), strict=True):
            table.text(x, row, str(count), ha="center", va="center", fontsize=9)
    table.set_title("Number at risk", fontsize=9, loc="left")
    table.tick_params(axis="x", labelbottom=False, length=0)
    table.tick_params(axis="y", length=0, pad=8)
    for side in ("top", "right", "bottom", "left"):
        table.spines[side].set_visible(False)
    fig.savefig(path, bbox_inches="tight")
    return path
