"""Server step of the inference phase: send the final federated model to every site, which segments its cases
without masks locally (:func:`common.segmentation.inference.run_inference`); only counts come back.

With ``segmentation.variability_tables`` the same model then runs the seed's segmentation study at every site
(:func:`common.segmentation.study.run_segmentation_study`): the inter-observer (rater vs rater) and automatic
(model vs rater) variability tables merged from the sites' aggregates, and the time leverage (a radiologist's
``manual_seconds_per_case`` over the model's measured seconds per case).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from common.errors import ConfigError
from common.segmentation.inference import lower_bound, run_inference
from common.segmentation.study import TABLE_TITLES, TABLES, run_segmentation_study, seed_rows
from common.weights import load_weights
from server.figures.segmentation import plot_variability
from server.phases.base import PhaseContext, imaging_grid

log = logging.getLogger("fedbiopsy.server")


def _study_tables(ctx: PhaseContext, weights: dict, plan: dict) -> dict[str, Any]:
    cfg = ctx.study.segmentation
    query = ctx.query(fixed=False, minimum=0)
    result = run_segmentation_study(query, weights, plan)
    tables = {}
    for name in TABLES:
        merged = result.tables[name]
        tables[name] = {"title": TABLE_TITLES[name], "sites": result.sites[name],
                        "n_cases": int(merged["dsc"]["n"]) if merged else 0,
                        "summary": merged, "rows": seed_rows(merged) if merged else None}
    leverage = result.leverage(cfg.manual_seconds_per_case)
    figure = plot_variability(tables, ctx.result_dir / "inference" / "variability.png")
    return {"tables": tables, "figures": {"variability": str(figure)} if figure else {},
            "model_seconds_per_case": result.model_seconds_per_case,
            "timed_cases": result.timed_cases, "manual_seconds_per_case": cfg.manual_seconds_per_case,
            "time_leverage": leverage,
            "refused": {str(node): reason for node, reason in query.errors.items()}}


def run(ctx: PhaseContext) -> dict:
    """Ask every site to segment its unlabelled cases with the final segmentation model (and, when configured,
    to score it against its raters)."""
    seg = ctx.outputs.get("segmentation")
    if not seg:
        raise ConfigError("study config", "the inference phase needs the segmentation phase's model",
                          "list 'segmentation' before 'inference' in phases")
    with open(seg["plan"], encoding="utf-8") as fh:
        plan = json.load(fh)
    weights = load_weights(seg["final_model"])
    query = ctx.query()
    result = run_inference(query, weights, plan)
    # a site that segmented fewer cases than its smallest cell sends "<k": it took part, count unknown (>= 1)
    ctx.participants["inference"] = {s: lower_bound(n) for s, n in result.segmented.items()}
    out: dict[str, Any] = {**imaging_grid(ctx),
                           "segmented_per_site": result.segmented,
                           "empty_per_site": result.empty,
                           "model": seg["final_model"],
                           "refused": {node.removeprefix("node-"): reason for node, reason in query.refused.items()}}
    if ctx.study.segmentation.variability_tables:
        out["segmentation_study"] = _study_tables(ctx, weights, plan)
    return out
