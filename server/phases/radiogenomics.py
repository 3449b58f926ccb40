"""Server half of the radiogenomics phase: the association table of imaging features with a genomic column.

Writes ``radiogenomics/association.json`` (one row per feature, sorted by p: group means, difference,
standardised difference, Welch's t, p, BH q, whether q < ``fdr``) and ``radiogenomics/volcano.png``.
"""

from __future__ import annotations

import json
import logging

from common.hashing import sha256_json
from common.radiogenomics import ASSOCIATION_MOMENTS, association_table
from server.figures.prognosis import plot_volcano
from server.phases.base import PhaseContext

log = logging.getLogger("fedbiopsy.server")


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
