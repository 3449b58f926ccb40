"""Figures of the classifier phase and the harmonisation experiment (PNG, matplotlib, written by the server)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_plot(curves: Mapping[str, Mapping[str, Sequence[float]]], path: Path, title: str = "") -> Path:
    """Observed rate against mean predicted score per calibration bin, one line per curve (pooled, sites)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for name, c in curves.items():
        pts = [(p, o) for p, o, n in zip(c["predicted"], c["observed"], c["n"], strict=True) if n and math.isfinite(p)]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, lw=2.0 if name == "pooled" else 0.8, label=name)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed fraction of subtype 1")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(title or "Reliability", fontsize=9)
    return _save(fig, path)


def group_metric_plot(groups: Mapping[str, Mapping[str, float]], metric: str, path: Path, title: str = "") -> Path:
    """One bar per group (site, vendor, ...) with its bootstrap CI."""
    plt = _plt()
    names = list(groups)
    vals = [groups[n].get(metric, math.nan) for n in names]
    lo = [v - groups[n].get(f"{metric}_lo", v) for n, v in zip(names, vals, strict=True)]
    hi = [groups[n].get(f"{metric}_hi", v) - v for n, v in zip(names, vals, strict=True)]
    fig, ax = plt.subplots(figsize=(max(3.5, 0.8 * len(names) + 1.5), 3.2))
    ax.bar(range(len(names)), vals, yerr=[lo, hi], capsize=3, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.set_title(title or metric, fontsize=9)
    return _save(fig, path)


def shap_bar_plot(shap: Mapping[str, Any], path: Path, top: int = 15, title: str = "") -> Path:
    """Federated mean |SHAP| per feature (largest first)."""
    plt = _plt()
    names = list(shap["features"])[:top][::-1]
    vals = list(shap["mean_abs_shap"])[:top][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.28 * len(names) + 1.2))
    ax.barh(range(len(names)), vals, color="tab:purple")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("mean |SHAP| (federated, all sites)")
    ax.set_title(title or "Feature relevance", fontsize=9)
    return _save(fig, path)


def condition_plot(rows: Sequence[Mapping[str, Any]], path: Path, metrics: Sequence[str] = ("auc", "accuracy"),
                   title: str = "") -> Path:
    """The harmonisation experiment: per condition, pooled metric with CI and each site's value."""
    plt = _plt()
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=False):
        for i, cond in enumerate(conditions):
            pooled = [r for r in rows if r["condition"] == cond and r["group"] == "pooled"]
            sites = [r for r in rows
                     if r["condition"] == cond and r.get("group_kind", "site") in ("site", "field_strength")]
            if pooled:
                p = pooled[0]
                v = p.get(metric, math.nan)
                ax.bar(i, v, color="tab:blue", alpha=0.6,
                       yerr=[[v - p.get(f"{metric}_lo", v)], [p.get(f"{metric}_hi", v) - v]], capsize=3)
            for j, s in enumerate(sites):
                ax.scatter(i - 0.25 + 0.5 * j / max(1, len(sites) - 1), s.get(metric, math.nan), s=16,
                           color=f"C{j + 1}", marker="^" if s.get("group_kind") == "field_strength" else "o",
                           label=s["group"] if i == 0 else None, zorder=3)
        ax.set_xticks(range(len(conditions)), conditions)
        ax.set_ylim(0, 1)
        ax.set_ylabel(metric)
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="lower center", ncol=max(1, len(labels)))
    fig.suptitle(title or "Harmonisation effect (bar: pooled, 95% CI; dots: sites; triangles: field strength)",
                 fontsize=9)
    fig.subplots_adjust(bottom=0.2)
    return _save(fig, path)


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    plt = _plt()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout(rect=(0, 0.08, 1, 1) if fig.legends else (0, 0, 1, 1))
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
