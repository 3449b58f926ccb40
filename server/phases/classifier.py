"""Server half of the classifier phase: the rounds of :func:`common.classifier.protocol.run_classifier`,
then the files, plots and artifacts.

1. (``classifier.standardise: nyul`` with compact features) ``classifier_nyul``: the federated Nyúl scale.
2. (feature models) ``classifier_moments``: every site's feature names (must agree) and moments of its
   training features; the pooled mean and SD standardise the features at every site.
3. For each model of ``classifier.models``: ``rounds`` of ``train.classifier`` (the global weights, the scaling,
   the round), replies checked and averaged (:func:`common.classifier.training.fedavg_round`); then one
   ``evaluate.classifier`` round whose replies are histograms, bootstrap replicates, SHAP sums and Grad-CAM
   statistics (:mod:`common.classifier.evaluation`). A site that fails a round is listed in its history.
4. Written under ``result_dir/classifier/``: each model's weights (``.npz``) and scaling (``.json``),
   ``summary.json``, ``metrics.csv`` (every metric per site / vendor / field strength / stratum / pool with CIs),
   ``fairness.md`` (worst-group gaps), ``comparison.md`` (model to model), reliability / AUC / SHAP plots.
   Each model is listed under ``artifacts`` (kind ``classifier``) with per-site and pooled metrics and, with DP,
   the epsilon each site has spent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.classifier.evaluation import registry_metrics
from common.classifier.explain import compare_models
from common.classifier.fairness import gap_table
from common.classifier.metrics import METRICS
from common.classifier.models import rounds_of
from common.classifier.protocol import (
    ClassifierRun,
    FeatureScaling,
    feature_scaling,
    nyul_scale,
    participants,
    run_classifier,
    uses_nyul,
)
from common.hashing import sha256_json
from server.figures.classifier import group_metric_plot, reliability_plot, shap_bar_plot
from server.phases.base import PhaseContext, imaging_grid


def _features(ctx: PhaseContext) -> tuple[FeatureScaling | None, list[int]]:
    """The feature models' shared scaling (none without feature models) and the nodes that train them."""
    cfg = ctx.study.classifier
    if all(m == "image" for m in cfg.models):
        return None, list(ctx.node_ids)
    query = ctx.query(fixed=False)
    nyul_json = nyul_scale(query, ctx.study.intensity_sequences) if uses_nyul(cfg) else ""
    features = feature_scaling(query, cfg, nyul_json)
    return features, sorted(query.node_of_site[s] for s in features.sources)


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


def _model_files(out: Path, run: ClassifierRun, rounds: int, settings_hash: str) -> tuple[Path, dict[str, str]]:
    """The model's weights and scaling, and its plots; returns the weights file and the plots by name."""
    kind, summary, f = run.kind, run.summary, run.scaling
    model_file = out / f"{kind}.npz"
    np.savez(model_file, **run.weights)  # type: ignore[arg-type]
    (out / f"{kind}.json").write_text(json.dumps(
        {"kind": kind, "feature_names": f.names if f else [], "mean": f.mean.tolist() if f else [],
         "scale": f.scale.tolist() if f else [], "rounds": rounds, "settings_hash": settings_hash}, indent=1))
    plots = {"reliability": str(reliability_plot(summary["reliability"], out / f"{kind}-reliability.png",
                                                 f"{kind}: reliability")),
             "auc_by_site": str(group_metric_plot(summary["per_site"], "auc", out / f"{kind}-auc-sites.png",
                                                  f"{kind}: AUC per site (95% CI)"))}
    if summary.get("shap"):
        plots["shap"] = str(shap_bar_plot(summary["shap"], out / f"{kind}-shap.png", title=f"{kind}: mean |SHAP|"))
    return model_file, plots


def run(ctx: PhaseContext) -> dict:
    """Train and evaluate every model of ``classifier.models``; register each as a ``classifier`` artifact."""
    study = ctx.study
    cfg = study.classifier
    out = ctx.result_dir / "classifier"
    out.mkdir(parents=True, exist_ok=True)
    features, nodes = _features(ctx)
    names = features.names if features else []
    sources = features.sources if features else {}
    nyul_json = features.nyul_json if features else ""
    harmonised = bool(sources) and all(v == study.harmonisation.output_file for v in sources.values())
    settings_hash = sha256_json({"features": cfg.features, "standardise": cfg.standardise, "names": names,
                                 "nyul": nyul_json, "sequences": list(study.intensity_sequences)})
    artifacts: list[dict[str, Any]] = []
    models: dict[str, dict[str, Any]] = {}
    per_model: dict[str, dict[str, Any]] = {}
    runs: dict[str, ClassifierRun] = {}
    rows: list[dict] = []
    spent: dict[str, float] = {}  # each site's cumulative epsilon (its ledger composes every model)
    # the image model's num-examples bound: each site's valid cases, as its fingerprint reply counted them
    cases = {s: int(v["n_cases"]) for s, v in (ctx.outputs.get("fingerprint") or {}).get("data_fingerprints",
                                                                                          {}).items()}
    for kind in cfg.models:
        res = run_classifier(ctx.query(nodes, fixed=False), kind, cfg, features=features,
                             n_channels=len(study.intensity_sequences), minimum=study.min_sites,
                             case_counts=cases or None)
        runs[kind] = res
        summary = res.summary
        model_file, plots = _model_files(out, res, rounds_of(kind, cfg), settings_hash)
        per_model[kind] = {"summary": summary, "history": res.history, "epsilon": res.epsilon, "plots": plots,
                           "errors": res.errors}
        models[kind] = {"pooled": summary["pooled"], "shap": summary.get("shap"),
                        "relevance": ({"in tumour": summary["gradcam"]["mass_in_tumour"],
                                       "outside": 1.0 - summary["gradcam"]["mass_in_tumour"]}
                                      if summary.get("gradcam") else None)}
        rows += _metric_rows(kind, summary)
        artifact = {"kind": "classifier", "path": str(model_file), "round": rounds_of(kind, cfg),
                    "metrics": registry_metrics(summary), "settings_hash": settings_hash}
        if harmonised and kind != "image":
            artifact["parent_kind"] = "harmonisation"
        if res.epsilon:
            artifact["epsilon"] = res.epsilon
            artifact["delta"] = cfg.dp.delta
            spent.update(res.epsilon)
        artifacts.append(artifact)
    _write_csv(rows, out / "metrics.csv")
    comparison = compare_models(models)
    (out / "comparison.md").write_text(_markdown(comparison, ["model", "auc", "accuracy", "confidence", "brier",
                                                              "most_relevant"]))
    fairness_rows = [{"model": k, **r} for k, v in per_model.items() for r in gap_table(v["summary"]["fairness"])]
    (out / "fairness.md").write_text(_markdown(fairness_rows, ["model", "attribute", "metric", "worst", "best",
                                                               "worst_value", "best_value", "gap"]))
    ctx.participants["classifier"] = participants(runs)
    result = {**imaging_grid(ctx), "models": per_model, "comparison": comparison, "fairness_gaps": fairness_rows,
              "feature_names": names, "feature_sources": sources, "lr": features.lr if features else cfg.lr,
              "epsilon": spent, "artifacts": artifacts, "settings_hash": settings_hash}
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    return result
