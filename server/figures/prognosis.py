"""Figures of the prognosis and radiogenomics phases: a forest plot of hazard ratios, calibration by risk group,
and a volcano plot of feature associations. PNG, matplotlib (no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _save(fig: object, path: Path) -> Path:
    fig.tight_layout()  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)  # type: ignore[attr-defined]
    return path


def plot_hazard_ratios(summary: dict, path: Path, alpha: float) -> Path:
    """A forest plot: each covariate's hazard ratio with its interval, on a log axis."""
    from matplotlib.figure import Figure

    names = summary["covariates"]
    hr = summary["hazard_ratios"]
    fig = Figure(figsize=(7.5, 1.2 + 0.38 * len(names)), dpi=120)
    ax = fig.add_subplot()
    y = np.arange(len(names))[::-1]
    for yi, name in zip(y, names, strict=True):
        h = hr[name]
        ax.plot([h["hr_lower"], h["hr_upper"]], [yi, yi], color="C0", lw=2)
        ax.plot(h["hazard_ratio"], yi, "s", color="C0", ms=6)
    ax.axvline(1.0, color="grey", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(y, labels=names, fontsize=9)
    ax.set_xlabel(f"hazard ratio ({100 * (1 - alpha):g}% CI, log scale)")
    c = summary["c_index"]
    test = f", test {c['test']:.3f}" if c.get("test") is not None else ""
    ax.set_title(f"Federated Cox over {len(summary['sites'])} sites: C-index train {c['train']:.3f}{test}",
                 fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_calibration(summary: dict, path: Path) -> Path | None:
    """Predicted against observed (Kaplan-Meier) survival at the calibration horizon, per risk group and split."""
    from matplotlib.figure import Figure

    cal = summary["calibration"]
    if cal["horizon"] is None or not any(cal["groups"].values()):
        return None
    fig = Figure(figsize=(5.2, 5.0), dpi=120)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    for k, (split, groups) in enumerate(cal["groups"].items()):
        pred = [g["predicted"] for g in groups]
        obs = [g["observed"] for g in groups]
        ax.plot(pred, obs, "o-", color=f"C{k}", label=f"{split} ({sum(g['n'] for g in groups)} patients)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"predicted survival at {cal['horizon']:g}")
    ax.set_ylabel("observed survival (Kaplan-Meier)")
    ax.set_title("Calibration by risk group", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_volcano(rows: list[dict], path: Path, title: str, fdr: float) -> Path:
    """Standardised difference against -log10 p, associated features (q < fdr) marked and named."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    ax = fig.add_subplot()
    x = np.array([r["standardised_difference"] for r in rows])
    y = -np.log10(np.clip([r["p"] for r in rows], 1e-300, 1.0))
    hit = np.array([r["associated"] for r in rows], dtype=bool)
    ax.scatter(x[~hit], y[~hit], s=14, color="grey", label="not associated")
    ax.scatter(x[hit], y[hit], s=18, color="C3", label=f"q < {fdr:g} (Benjamini-Hochberg)")
    for r, xi, yi in list(zip(rows, x, y, strict=True))[:8]:
        if r["associated"]:
            ax.annotate(r["feature"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("standardised mean difference (other - reference level)")
    ax.set_ylabel("-log10 p (Welch)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
