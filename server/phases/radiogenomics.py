"""Server half of the radiogenomics phase: the association table of imaging features with a genomic column.

Writes ``radiogenomics/association.json`` (one row per feature, sorted by p: group means, difference,
standardised difference, Welch's t, p, BH q, whether q < ``fdr``) and ``radiogenomics/volcano.png``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from common.hashing import sha256_json
from common.radiogenomics import ASSOCIATION_MOMENTS, association_table
from server.phases.base import PhaseContext

log = logging.getLogger("fedbiopsy.server")


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def run(ctx: PhaseContext) -> dict:
    """The whole radiogenomics phase; returns the JSON-serialisable summary."""
    cfg = ctx.study.radiogenomics
    replies = ctx.query()(ASSOCIATION_MOMENTS, {})
    held = sorted(s for s, r in replies.items() if int(r.get("held", 0)))  # type: ignore[call-overload]
    if len(held) == len(replies):
        log.warning("radiogenomics: every site's release ledger held its answer")
        return {"table": cfg.table, "column": cfg.column, "held": held, "rows": [],
                "note": "every site held its answer: its genomic groups differ from sets it released before (e.g. "
                        "k-means clusters) by fewer than min_cell patients"}
    table = association_table(replies)
    rows = table.rows(cfg.fdr)
    out_dir = ctx.result_dir / "radiogenomics"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"table": cfg.table, "column": cfg.column, "levels": list(cfg.levels), "fdr": cfg.fdr,
               "n": {cfg.levels[0]: int(table.n[0]), cfg.levels[1]: int(table.n[1])},
               "withheld_groups": table.withheld, "held": held,
               "associated": [r["feature"] for r in rows if r["associated"]],
               "rows": rows,
               "method": "Welch's t-test per feature on the pooled group moments (= scipy ttest_ind, equal_var "
                         "False, on the pooled rows); Benjamini-Hochberg q-values across features"}
    path = out_dir / "association.json"
    path.write_text(json.dumps(summary, indent=2))
    png = plot_volcano(rows, out_dir / "volcano.png",
                       f"{cfg.column}: {cfg.levels[1]} vs {cfg.levels[0]} ({int(table.n.sum())} patients)", cfg.fdr)
    associated = [r["feature"] for r in rows if r["associated"]]
    log.info("radiogenomics: %d of %d feature(s) associated with %s at q < %g", len(associated), len(rows),
             cfg.column, cfg.fdr)
    ctx.participants["radiogenomics"] = {s: 0 for s in table.withheld}
    # a result table, not a model: kept in the result folder (with its settings' hash), not in the registry
    return {**{k: v for k, v in summary.items() if k != "rows"}, "top": rows[:5],
            "files": [str(path), str(png)], "settings_hash": sha256_json(cfg.model_dump(mode="json"))}
