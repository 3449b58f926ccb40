"""Server step of the segmentation phase: one plan for all sites, then federated rounds of a validated strategy.

1. The plan (network, patch and batch size, nnU-Net plans when ``network: nnunet``) comes from the fingerprint
   phase's aggregated output only, on the preprocessing plan's grid when the sites read preprocessed images
   (``inputs`` and ``grid_spacing`` in the result); it travels to every site with each round.
2. The rounds are :func:`common.segmentation.protocol.run_segmentation`'s: the cohort check
   (``segmentation_cohort``), the initial model evaluated at every site (round 0), then train, validate and
   aggregate (by the study's Flower strategy, :func:`server.strategies.make_aggregate`), evaluate.
3. Here: each round's global model is written under ``result_dir/segmentation/`` and listed under
   ``artifacts`` (kind ``segmentation``) with per-site and pooled metrics and, with DP, the epsilon each site
   has spent.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from common.errors import ConfigError
from common.hashing import derive_seed, sha256_json
from common.segmentation.metrics import headline, unflatten
from common.segmentation.networks import build_network, count_parameters, get_weights
from common.segmentation.plan import local_trainer, make_plan
from common.segmentation.protocol import RoundRecord, run_segmentation
from common.weights import save_weights
from server.phases.base import PhaseContext, imaging_grid
from server.strategies import make_aggregate

log = logging.getLogger("fedbiopsy.server")


def _round_view(record: RoundRecord, dp: bool) -> dict:
    view: dict = {"round": record.round, "sites": {s: unflatten(flat) for s, flat in record.evaluate.items()},
                  "pooled": record.pooled,
                  "n_heldout": {s: int(flat.get("num-examples", 0)) for s, flat in record.evaluate.items()}}
    if record.round > 0:
        view["train"] = record.train
        view["rejected"] = record.rejected
        if dp:
            view["epsilon"] = record.epsilon()
    view["errors"] = record.errors
    return view


def _artifact_metrics(view: dict) -> dict:
    metrics = {s: headline(summary) for s, summary in view["sites"].items()}
    if view["pooled"]:
        metrics["pooled"] = headline(view["pooled"])
    return metrics


def run(ctx: PhaseContext) -> dict:
    """Plan, then federated training rounds; returns per-round metrics, epsilon and the artifacts."""
    study = ctx.study
    cfg = study.segmentation
    fingerprint = ctx.outputs.get("fingerprint")
    if not fingerprint:
        raise ConfigError("study config", "the segmentation phase needs the fingerprint phase's output",
                          "list 'fingerprint' before 'segmentation' in phases")
    out_dir = ctx.result_dir / "segmentation"
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = imaging_grid(ctx)
    plan = make_plan(fingerprint, study, grid["grid_spacing"])
    plan_path = out_dir / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    plan_hash = sha256_json(plan)

    net = build_network(plan, seed=derive_seed(cfg.seed, "initial-model"))
    initial = get_weights(net)
    log.info("segmentation: %s network, %d parameters, patch %s, batch %d, strategy %s", plan["network"],
             count_parameters(net), plan["patch_size"], plan["batch_size"], cfg.strategy)
    save_weights(initial, out_dir / "model_round000.npz")
    saved: dict[int, Path] = {}

    def on_model(rnd: int, weights: dict[str, np.ndarray]) -> None:
        saved[rnd] = save_weights(weights, out_dir / f"model_round{rnd:03d}.npz")

    # a training round goes on when a site fails it (as Flower's strategies do); the cohort needs min_sites
    query = ctx.query(fixed=False, minimum=0)  # the driver checks min_sites; an empty round keeps the model
    outcome = run_segmentation(query, plan, initial, cfg, make_aggregate(cfg), min_sites=study.min_sites,
                               on_model=on_model)
    final_path = save_weights(outcome.weights, out_dir / "model_final.npz")

    rounds = [_round_view(record, cfg.dp.enabled) for record in outcome.rounds]
    artifacts: list[dict] = [{"kind": "plan", "path": str(plan_path), "round": None, "metrics": {},
                              "settings_hash": plan_hash}]
    for rnd, path in sorted(saved.items()):
        entry = {"kind": "segmentation", "path": str(path), "round": rnd,
                 "metrics": _artifact_metrics(rounds[rnd]), "settings_hash": plan_hash, "parent_kind": "plan"}
        if cfg.dp.enabled:
            entry["epsilon"] = rounds[rnd].get("epsilon", {})
        artifacts.append(entry)

    def pooled_dsc(view: dict) -> float | None:
        return view["pooled"]["dsc"]["median"] if view["pooled"] else None

    initial_dsc = pooled_dsc(rounds[0])
    final_dsc = pooled_dsc(rounds[-1])
    ctx.participants["segmentation"] = {s: c["n_train"] for s, c in outcome.cohort.items()}
    epsilon = {}
    if cfg.dp.enabled:
        for view in rounds[1:]:
            epsilon.update(view.get("epsilon", {}))
    return {
        "plan": str(plan_path),
        "plan_hash": plan_hash,
        "network": plan["network"],
        "trainer": local_trainer(plan, study),
        **grid,
        "n_parameters": count_parameters(net),
        "patch_size": plan["patch_size"],
        "batch_size": plan["batch_size"],
        "strategy": cfg.strategy,
        "cohort": outcome.cohort,
        "refused": {node.removeprefix("node-"): reason for node, reason in query.refused.items()},
        "rounds": rounds,
        "initial_dsc_median": initial_dsc,
        "final_dsc_median": final_dsc,
        "dsc_gain": (final_dsc - initial_dsc) if initial_dsc is not None and final_dsc is not None else None,
        "epsilon": epsilon,
        "final_model": str(final_path),
        "artifacts": artifacts,
    }
