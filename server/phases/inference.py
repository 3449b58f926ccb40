"""Server step of the inference phase: send the final federated model to every site, which segments its cases
without masks locally (:func:`common.segmentation.inference.run_inference`); only counts come back."""

from __future__ import annotations

import json

from common.errors import ConfigError
from common.segmentation.inference import lower_bound, run_inference
from common.weights import load_weights
from server.phases.base import PhaseContext


def run(ctx: PhaseContext) -> dict:
    """Ask every site to segment its unlabelled cases with the final segmentation model."""
    seg = ctx.outputs.get("segmentation")
    if not seg:
        raise ConfigError("study config", "the inference phase needs the segmentation phase's model",
                          "list 'segmentation' before 'inference' in phases")
    with open(seg["plan"], encoding="utf-8") as fh:
        plan = json.load(fh)
    query = ctx.query()
    result = run_inference(query, load_weights(seg["final_model"]), plan)
    # a site that segmented fewer cases than its smallest cell sends "<k": it took part, count unknown (>= 1)
    ctx.participants["inference"] = {s: lower_bound(n) for s, n in result.segmented.items()}
    return {"segmented_per_site": result.segmented,
            "empty_per_site": result.empty,
            "model": seg["final_model"],
            "refused": {node.removeprefix("node-"): reason for node, reason in query.refused.items()}}
