"""Figures of the segmentation study: the two variability tables side by side."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_variability(tables: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Median and IQR of DSC, AUC ROC, 1-FPR and 1-FNR for each released table (None when neither was)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    released = {name: t for name, t in tables.items() if t.get("summary")}
    if not released:
        return None
    metrics = (("dsc", "DSC", False), ("auc", "AUC ROC", False), ("fpr", "1-FPR", True), ("fnr", "1-FNR", True))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(released)
    for i, (name, t) in enumerate(sorted(released.items())):
        s = t["summary"]
        xs, meds, lo, hi = [], [], [], []
        for j, (key, _, flip) in enumerate(metrics):
            q25, med, q75 = s[key]["q25"], s[key]["median"], s[key]["q75"]
            if flip:
                q25, med, q75 = 1 - q75, 1 - med, 1 - q25
            xs.append(j + (i - (len(released) - 1) / 2) * width)
            meds.append(med)
            lo.append(med - q25)
            hi.append(q75 - med)
        label = f"{'rater vs rater' if name == 'inter' else 'model vs rater'} (n={t['n_cases']})"
        ax.bar(xs, meds, width=width, yerr=[lo, hi], capsize=3, label=label, alpha=0.85)
    ax.set_xticks(range(len(metrics)), [m[1] for m in metrics])
    ax.set_ylim(min(0.5, ax.get_ylim()[0]), 1.02)
    ax.set_ylabel("median (bars: IQR)")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Segmentation variability: radiologists vs the federated model", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path
