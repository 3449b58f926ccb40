"""Server step of the segmentation phase: one plan for all sites, then federated rounds of a validated strategy.

1. The plan (network, patch and batch size, nnU-Net plans when ``network: nnunet``) comes from the fingerprint
   phase's aggregated output only; it travels to every site with each round.
2. ``query.segmentation_cohort`` maps nodes to sites and confirms each has enough training and held-out cases.
3. The initial model is evaluated at every site (round 0), then ``strategy.start`` runs the rounds: train,
   validate and aggregate, evaluate. Each round's global model is written under ``result_dir/segmentation/``
   and listed under ``artifacts`` (kind ``segmentation``) with per-site and pooled metrics and, with DP, the
   epsilon each site has spent.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from client.app import STUDY_KEY
from client.segmentation_handlers import PLAN_KEY
from common.errors import ConfigError
from common.hashing import sha256_json
from common.segmentation.metrics import headline, unflatten
from common.segmentation.plan import make_plan
from server.federation import query_sites
from server.phases.base import PhaseContext
from server.strategies import RoundRecords, make_strategy

log = logging.getLogger("fedbiopsy.server")


def save_weights(weights: dict[str, np.ndarray], path: Path) -> Path:
    """Weights as an ``.npz`` (no pickle), keyed by parameter name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **weights)  # type: ignore[arg-type]
    return path


def load_weights(path: Path | str) -> dict[str, np.ndarray]:
    """Weights written by :func:`save_weights`."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _round_view(records: RoundRecords, rnd: int, dp: bool) -> dict:
    sites = {s: unflatten(flat) for s, flat in records.evaluate.get(rnd, {}).items()}
    view = {"round": rnd, "sites": sites, "pooled": records.pooled.get(rnd, {}),
            "n_heldout": {s: int(flat.get("num-examples", 0)) for s, flat in records.evaluate.get(rnd, {}).items()}}
    if rnd > 0:
        view["train"] = records.train.get(rnd, {})
        view["rejected"] = records.rejected.get(rnd, [])
        if dp:
            view["epsilon"] = {s: m["epsilon"] for s, m in records.train.get(rnd, {}).items()}
    view["errors"] = records.errors.get(rnd, [])
    return view


def _artifact_metrics(view: dict) -> dict:
    metrics = {s: headline(summary) for s, summary in view["sites"].items()}
    if view["pooled"]:
        metrics["pooled"] = headline(view["pooled"])
    return metrics


def run(ctx: PhaseContext) -> dict:
    """Plan, then federated training rounds; returns per-round metrics, epsilon and the artifacts."""
    from client.training.networks import build_network, count_parameters, get_weights
    from client.training.task import derive_seed

    study = ctx.study
    cfg = study.segmentation
    fingerprint = ctx.outputs.get("fingerprint")
    if not fingerprint:
        raise ConfigError("study config", "the segmentation phase needs the fingerprint phase's output",
                          "list 'fingerprint' before 'segmentation' in phases")
    out_dir = ctx.result_dir / "segmentation"
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(fingerprint, study)
    plan_path = out_dir / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    plan_hash = sha256_json(plan)

    cohort = query_sites(ctx.grid, "segmentation_cohort", study, node_ids=ctx.node_ids)
    site_names = {node: site for site, node in cohort.node_of_site.items()}
    net = build_network(plan, seed=derive_seed(cfg.seed, "initial-model"))
    initial = get_weights(net)
    log.info("segmentation: %s network, %d parameters, patch %s, batch %d, %d site(s), strategy %s",
             plan["network"], count_parameters(net), plan["patch_size"], plan["batch_size"], len(cohort.replies),
             cfg.strategy)

    saved: dict[int, Path] = {}

    def on_aggregate(rnd: int, arrays: ArrayRecord) -> None:
        saved[rnd] = save_weights({k: v.numpy() for k, v in arrays.items()}, out_dir / f"model_round{rnd:03d}.npz")

    min_nodes = min(study.min_sites, len(cohort.replies))
    strategy = make_strategy(cfg, min_nodes, site_names, on_aggregate)
    config = {STUDY_KEY: json.dumps(study.model_dump(mode="json")), PLAN_KEY: json.dumps(plan)}
    initial_arrays = ArrayRecord({k: Array(v) for k, v in initial.items()})
    save_weights(initial, out_dir / "model_round000.npz")
    strategy.evaluate_now(0, initial_arrays, ConfigRecord(dict(config)), ctx.grid, study.round_timeout_s)
    result = strategy.start(grid=ctx.grid, initial_arrays=initial_arrays, num_rounds=cfg.rounds,
                            timeout=study.round_timeout_s, train_config=ConfigRecord(dict(config)),
                            evaluate_config=ConfigRecord(dict(config)))
    final = {k: v.numpy() for k, v in result.arrays.items()} if result.arrays is not None else initial
    final_path = save_weights(final, out_dir / "model_final.npz")

    records = strategy.records
    rounds = [_round_view(records, r, cfg.dp.enabled) for r in range(0, cfg.rounds + 1)]
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
    ctx.participants["segmentation"] = {s: int(r["n_train"]) for s, r in cohort.replies.items()}  # type: ignore[call-overload]
    epsilon = {}
    if cfg.dp.enabled:
        for view in rounds[1:]:
            epsilon.update(view.get("epsilon", {}))
    return {
        "plan": str(plan_path),
        "plan_hash": plan_hash,
        "network": plan["network"],
        "n_parameters": count_parameters(net),
        "patch_size": plan["patch_size"],
        "batch_size": plan["batch_size"],
        "strategy": cfg.strategy,
        "cohort": {s: {"n_train": int(r["n_train"]), "n_heldout": int(r["n_heldout"])}  # type: ignore[call-overload]
                   for s, r in cohort.replies.items()},
        "refused": {str(n): reason for n, reason in cohort.errors.items()},
        "rounds": rounds,
        "initial_dsc_median": initial_dsc,
        "final_dsc_median": final_dsc,
        "dsc_gain": (final_dsc - initial_dsc) if initial_dsc is not None and final_dsc is not None else None,
        "epsilon": epsilon,
        "final_model": str(final_path),
        "artifacts": artifacts,
    }
