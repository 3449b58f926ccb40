"""Server step of the local segmentation phase: send the final federated model to every site, which segments
its cases without masks locally (see :mod:`client.steps.inference`); only counts come back."""

from __future__ import annotations

import json

import numpy as np

from client.steps.inference import WEIGHT_PREFIX
from common.errors import ConfigError
from server.federation import query_sites
from server.phases.base import PhaseContext


def run(ctx: PhaseContext) -> dict:
    """Ask every site to segment its unlabelled cases with the final segmentation model."""
    seg = ctx.outputs.get("segmentation")
    if not seg:
        raise ConfigError("study config", "the inference phase needs the segmentation phase's model",
                          "list 'segmentation' before 'inference' in phases")
    with np.load(seg["final_model"], allow_pickle=False) as data:
        payload: dict[str, object] = {f"{WEIGHT_PREFIX}{k}": data[k] for k in data.files}
    with open(seg["plan"], encoding="utf-8") as fh:
        payload["plan_json"] = json.dumps(json.load(fh))
    result = query_sites(ctx.grid, "segment_unlabelled", ctx.study, payload, node_ids=ctx.node_ids)
    segmented = {s: int(r["n_segmented"]) for s, r in result.replies.items()}  # type: ignore[call-overload]
    ctx.participants["inference"] = segmented
    return {"segmented_per_site": segmented,
            "empty_per_site": {s: int(r["n_empty"]) for s, r in result.replies.items()},  # type: ignore[call-overload]
            "model": seg["final_model"],
            "refused": {str(n): reason for n, reason in result.errors.items()}}
