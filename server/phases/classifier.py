"""Server step of the classifier phase: pooled feature scaling, FedAvg rounds, federated evaluation, report.

1. (``classifier.standardise: nyul`` with compact features) ``query.classifier_nyul``: the federated Nyúl scale.
2. (feature models) ``query.classifier_moments``: every site's feature names (must agree) and moments of its
   training features; the pooled mean and SD standardise the features at every site.
3. For each model of ``classifier.models``: ``rounds`` of ``train.classifier`` messages (the global weights, the
   scaling, the round), replies checked and averaged (:func:`common.classification.training.fedavg_round`); then
   one ``evaluate.classifier`` message whose replies are histograms, bootstrap replicates, SHAP sums and
   Grad-CAM statistics (:mod:`common.classification.evaluation`).
4. Written under ``result_dir/classifier/``: each model's weights (``.npz``) and scaling (``.json``),
   ``summary.json``, ``metrics.csv`` (every metric per site / vendor / field strength / stratum / pool with CIs),
   ``fairness.md`` (worst-group gaps), ``comparison.md`` (model to model), reliability / AUC / SHAP plots.
   Each model is listed under ``artifacts`` (kind ``classifier``) with per-site and pooled metrics and, with DP,
   the epsilon each site has spent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message

from client.app import STUDY_KEY
from client.classifier_handlers import ACTION
from client.records import decode, encode
from client.steps.classifier import WEIGHT_PREFIX
from client.training.classifier_models import build_model, model_weights
from client.training.classifier_site import rounds_of
from common.classification.evaluation import registry_metrics, summarise_evaluation
from common.classification.explain import compare_models
from common.classification.fairness import gap_table
from common.classification.metrics import METRICS
from common.classification.training import fedavg_round, pooled_correlation, scaling, step_size
from common.errors import ProtocolError
from common.hashing import sha256_json
from common.nyul import aggregate_nyul
from common.pooled_moments import merge_moments
from server.federation import NotEnoughSitesError, query_sites
from server.phases.base import PhaseContext
from server.phases.classifier_plots import group_metric_plot, reliability_plot, shap_bar_plot

log = logging.getLogger("fedbiopsy.server")
Payload = dict[str, object]


def exchange(ctx: PhaseContext, category: str, payload: Mapping[str, object], node_ids: list[int]
             ) -> tuple[dict[str, Payload], dict[int, str]]:
    """Send ``<category>.classifier`` with ``payload`` to ``node_ids``; valid replies by site, errors by node."""
    study = ctx.study
    body = dict(payload)
    body[STUDY_KEY] = json.dumps(study.model_dump(mode="json"))
    messages = [Message(encode(body), dst_node_id=n, message_type=f"{category}.{ACTION}", ttl=study.round_timeout_s)
                for n in node_ids]
    replies: dict[str, Payload] = {}
    errors: dict[int, str] = {}
    for reply in ctx.grid.send_and_receive(messages, timeout=study.round_timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            errors[node] = str(reply.error.reason)
            log.warning("%s.%s: node %s answered an error: %s", category, ACTION, node, reply.error.reason)
            continue
        content = decode(reply.content)
        replies[str(content.pop("site_id", f"node-{node}"))] = content
    if len(replies) < study.min_sites:
        raise NotEnoughSitesError(f"{category}.{ACTION}: {len(replies)} valid repl(ies), the study needs "
                                  f"{study.min_sites} ({'; '.join(errors.values()) or 'no reply in time'})")
    return replies, errors


def _feature_setup(ctx: PhaseContext, nyul_json: str
                   ) -> tuple[list[str], np.ndarray, np.ndarray, float, list[int], dict]:
    """Feature names (equal at every site), pooled scaling, step size, the answering nodes, each site's source."""
    res = query_sites(ctx.grid, "classifier_moments", ctx.study, {"nyul_json": nyul_json}, node_ids=ctx.node_ids)
    names: list[str] | None = None
    first = ""
    sources = {s: str(r.pop("feature_source", "")) for s, r in res.replies.items()}
    for site, reply in sorted(res.replies.items()):
        got = [str(n) for n in reply.pop("feature_names")]  # type: ignore[attr-defined]
        if names is None:
            names, first = got, site
        elif got != names:
            raise ProtocolError(site, f"its {len(got)} feature columns differ from site {first!r}'s {len(names)}",
                                "extract and harmonise features with the same settings at every site")
    cfg = ctx.study.classifier
    moments = merge_moments(res.replies)
    mean, scale = scaling(moments)
    lr = step_size(pooled_correlation(res.replies, moments), cfg.l2, cfg.lr) if cfg.auto_lr else cfg.lr
    return names or [], mean, scale, lr, sorted(res.node_of_site.values()), sources


def _train(ctx: PhaseContext, kind: str, base: Payload, weights: dict[str, np.ndarray], nodes: list[int]
           ) -> tuple[dict[str, np.ndarray], list[dict], dict[str, float], dict[str, int]]:
    cfg = ctx.study.classifier
    history: list[dict] = []
    epsilon: dict[str, float] = {}
    n_train: dict[str, int] = {}
    for rnd in range(1, rounds_of(kind, cfg) + 1):
        payload = {**base, "round": rnd, **{f"{WEIGHT_PREFIX}{k}": v for k, v in weights.items()}}
        replies, errors = exchange(ctx, "train", payload, nodes)
        updates = {}
        for site, r in replies.items():
            w = {k[len(WEIGHT_PREFIX):]: np.asarray(v) for k, v in r.items() if k.startswith(WEIGHT_PREFIX)}
            updates[site] = (w, float(r["num-examples"]))  # type: ignore[arg-type]
            n_train[site] = int(float(r["num-examples"]))  # type: ignore[arg-type]
            if float(r.get("dp", 0.0)):  # type: ignore[arg-type]
                epsilon[site] = float(r["epsilon"])  # type: ignore[arg-type]
        weights, rejected = fedavg_round(weights, updates, cfg.max_update_norm, minimum=ctx.study.min_sites)
        loss = {s: float(r.get("train-loss", np.nan)) for s, r in replies.items()}  # type: ignore[arg-type]
        history.append({"round": rnd, "train_loss": loss, "rejected": rejected,
                        "errors": {str(n): e for n, e in errors.items()}})
        if rnd == 1 or rnd % 10 == 0 or rnd == rounds_of(kind, cfg):
            log.info("classifier %s round %d: mean train loss %.4f over %d site(s)", kind, rnd,
                     float(np.nanmean(list(loss.values()))), len(replies))
    return weights, history, epsilon, n_train


def _metric_rows(model: str, summary: Mapping) -> list[dict]:
    rows = [{"model": model, "attribute": "pooled", "level": "pooled", **summary["pooled"]}]
    for attr, body in summary["fairness"].items():
        for level, m in body["levels"].items():
            rows.append({"model": model, "attribute": attr, "level": level, **m})
    return rows


def _write_csv(rows: list[dict], path: Path) -> Path:
    import pandas as pd

    cols = ["model", "attribute", "level", "n", "prevalence"] + [f"{m}{s}" for m in METRICS
                                                                  for s in ("", "_lo", "_hi")] + ["confidence"]
    pd.DataFrame(rows).reindex(columns=cols).to_csv(path, index=False, float_format="%.6g")
    return path


def _markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run(ctx: PhaseContext) -> dict:
    """Train and evaluate every model of ``classifier.models``; register each as a ``classifier`` artifact."""
    study = ctx.study
    cfg = study.classifier
    out = ctx.result_dir / "classifier"
    out.mkdir(parents=True, exist_ok=True)
    feature_kinds = [m for m in cfg.models if m != "image"]
    nyul_json = ""
    if cfg.standardise == "nyul" and cfg.features != "table" and feature_kinds:
        res = query_sites(ctx.grid, "classifier_nyul", study, node_ids=ctx.node_ids)
        nyul_json = json.dumps(aggregate_nyul(res.replies, study.sequences))
    names: list[str] = []
    mean = scale = np.zeros(0)
    nodes = list(ctx.node_ids)
    sources: dict[str, str] = {}
    lr = cfg.lr
    if feature_kinds:
        names, mean, scale, lr, nodes, sources = _feature_setup(ctx, nyul_json)
    harmonised = bool(sources) and all(v == study.harmonisation.output_file for v in sources.values())
    settings_hash = sha256_json({"features": cfg.features, "standardise": cfg.standardise, "names": names,
                                 "nyul": nyul_json, "sequences": list(study.sequences)})
    artifacts: list[dict[str, Any]] = []
    models: dict[str, dict[str, Any]] = {}
    per_model: dict[str, dict[str, Any]] = {}
    rows: list[dict] = []
    participants: dict[str, int] = {}
    spent: dict[str, float] = {}  # each site's cumulative epsilon (its ledger composes every model)
    for kind in cfg.models:
        base: Payload = {"model": kind}
        if kind != "image":
            base.update(feature_names=names, x_mean=mean, x_scale=scale, nyul_json=nyul_json, lr=lr)
        init = model_weights(build_model(kind, len(names), cfg, n_channels=len(study.sequences)))
        weights, history, epsilon, n_train = _train(ctx, kind, base, init, nodes)
        replies, errors = exchange(ctx, "evaluate", {**base, **{f"{WEIGHT_PREFIX}{k}": v for k, v in weights.items()}},
                                   nodes)
        attrs = {s: {"vendor": str(r.pop("vendor", "")), "field_strength": str(r.pop("field_strength", ""))}
                 for s, r in replies.items()}
        summary = summarise_evaluation(replies, attrs, bins=cfg.score_bins, calibration_bins=cfg.calibration_bins,
                                       feature_names=names if kind != "image" else None)
        for s, r in replies.items():
            participants[s] = max(participants.get(s, 0), n_train.get(s, 0) + int(r["n"]))  # type: ignore[call-overload]
        model_file = out / f"{kind}.npz"
        np.savez(model_file, **weights)  # type: ignore[arg-type]
        (out / f"{kind}.json").write_text(json.dumps(
            {"kind": kind, "feature_names": names, "mean": mean.tolist(), "scale": scale.tolist(),
             "rounds": rounds_of(kind, cfg), "settings_hash": settings_hash}, indent=1))
        plots = {"reliability": str(reliability_plot(summary["reliability"], out / f"{kind}-reliability.png",
                                                     f"{kind}: reliability")),
                 "auc_by_site": str(group_metric_plot(summary["per_site"], "auc", out / f"{kind}-auc-sites.png",
                                                      f"{kind}: AUC per site (95% CI)"))}
        if summary.get("shap"):
            plots["shap"] = str(shap_bar_plot(summary["shap"], out / f"{kind}-shap.png", title=f"{kind}: mean |SHAP|"))
        per_model[kind] = {"summary": summary, "history": history, "epsilon": epsilon, "plots": plots,
                           "errors": {str(n): e for n, e in errors.items()}}
        models[kind] = {"pooled": summary["pooled"], "shap": summary.get("shap"),
                        "relevance": ({"in tumour": summary["gradcam"]["mass_in_tumour"],
                                       "outside": 1.0 - summary["gradcam"]["mass_in_tumour"]}
                                      if summary.get("gradcam") else None)}
        rows += _metric_rows(kind, summary)
        artifact = {"kind": "classifier", "path": str(model_file), "round": rounds_of(kind, cfg),
                    "metrics": registry_metrics(summary), "settings_hash": settings_hash}
        if harmonised and kind != "image":
            artifact["parent_kind"] = "harmonisation"
        if epsilon:
            artifact["epsilon"] = epsilon
            artifact["delta"] = cfg.dp.delta
            spent.update(epsilon)
        artifacts.append(artifact)
        log.info("classifier %s: pooled AUC %.3f (95%% CI %.3f-%.3f), accuracy %.3f", kind,
                 summary["pooled"]["auc"], summary["pooled"].get("auc_lo", np.nan),
                 summary["pooled"].get("auc_hi", np.nan), summary["pooled"]["accuracy"])
    _write_csv(rows, out / "metrics.csv")
    comparison = compare_models(models)
    (out / "comparison.md").write_text(_markdown(comparison, ["model", "auc", "accuracy", "confidence", "brier",
                                                              "most_relevant"]))
    fairness_rows = [{"model": k, **r} for k, v in per_model.items() for r in gap_table(v["summary"]["fairness"])]
    (out / "fairness.md").write_text(_markdown(fairness_rows, ["model", "attribute", "metric", "worst", "best",
                                                               "worst_value", "best_value", "gap"]))
    ctx.participants["classifier"] = participants
    result = {"models": per_model, "comparison": comparison, "fairness_gaps": fairness_rows,
              "feature_names": names, "feature_sources": sources, "lr": lr, "epsilon": spent, "artifacts": artifacts,
              "settings_hash": settings_hash}
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    return result
