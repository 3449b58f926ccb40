"""Server step of the outcomes phase: federated k-means, then Kaplan-Meier per cluster, log-rank and Cox.

Rounds: ``kmeans`` moments -> (k-means++ local centres) -> Lloyd ``assign`` until converged -> ``labels``
(each site keeps its labels); ``survival`` ``table`` -> Kaplan-Meier per cluster, log-rank; ``cox_moments``
-> ``cox`` per Newton step (Cox on cluster membership, cluster 0 the reference). The sites of the first
round take part in every later round; a site dropping out stops the phase. Exact event times are used
only when ``outcomes.exact_times`` is "auto" and every site's policy allows them; otherwise binned.
Writes ``outcomes/outcomes_summary.json`` and ``outcomes/km_clusters.png`` under the result folder.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from common.cox import cox_result, efron_derivatives, merge_cox_sums, newton_raphson
from common.errors import ConfigError, ProtocolError
from common.hashing import sha256_json
from common.kmeans import LloydLoop, kmeans_plusplus_from_summaries, random_centres
from common.pooled_moments import merge_moments
from common.survival import (
    BINNED,
    EXACT,
    SurvivalTable,
    kaplan_meier,
    logrank_test,
    median_survival,
    merge_survival_tables,
)
from server.federation import QueryResult, query_sites
from server.phases.base import PhaseContext
from server.survival_plot import plot_kaplan_meier

log = logging.getLogger("fedbiopsy.server")
PARENT_KIND = {"signature_scores.csv": "signature", "features_harmonised.csv": "harmonisation"}


def _query(ctx: PhaseContext, action: str, payload: dict, nodes: list[int]) -> QueryResult:
    return query_sites(ctx.grid, action, ctx.study, payload, node_ids=nodes, minimum=len(nodes))


def _kmeans(ctx: PhaseContext) -> tuple[dict, dict, list[int], dict]:
    """Cluster the sites' patients; returns the k-means summary, the payload base, the nodes and first replies."""
    cfg = ctx.study.outcomes
    first = query_sites(ctx.grid, "kmeans", ctx.study, {"op": "moments"}, node_ids=ctx.node_ids)
    sites = sorted(first.replies)
    nodes = [first.node_of_site[s] for s in sites]
    features = [str(f) for f in first.replies[sites[0]]["features"]]  # type: ignore[attr-defined]
    for s in sites[1:]:
        if [str(f) for f in first.replies[s]["features"]] != features:  # type: ignore[attr-defined]
            raise ProtocolError(s, "its feature columns differ from those of site " + repr(sites[0]),
                                "use the same feature table (signature) at every site, or set outcomes.features")
    moments = merge_moments(first.replies)
    sd = moments.std(ddof=0)
    if cfg.standardise:
        shift, scale = moments.mean, np.where(sd > 0, sd, 1.0)
    else:
        shift, scale = np.zeros_like(sd), np.ones_like(sd)
    base = {"mean": shift, "scale": scale}
    var_t = moments.var(ddof=0) / scale**2
    tol = 0.0 if cfg.tol == 0 else float(np.mean(var_t) * cfg.tol)
    if cfg.init == "kmeans++":
        res = _query(ctx, "kmeans", {**base, "op": "local_centres", "n_centres": cfg.local_centres, "seed": cfg.seed},
                     nodes)
        init = kmeans_plusplus_from_summaries(res.replies, cfg.k, cfg.seed)
    elif cfg.init == "given":
        init = np.asarray(cfg.initial_centres, dtype=np.float64)
        if init.shape != (cfg.k, len(features)):
            raise ConfigError("study config", f"outcomes.initial_centres has shape {init.shape}, expected "
                              f"({cfg.k}, {len(features)}) for k={cfg.k} and features {features}",
                              "give k rows of one value per feature")
    else:
        init = random_centres(cfg.k, (moments.mean - shift) / scale, sd / scale, cfg.seed)
    loop = LloydLoop(centres=init, tol=tol, max_iter=cfg.max_iter)
    while True:
        res = _query(ctx, "kmeans", {**base, "op": "assign", **loop.request()}, nodes)
        if loop.update(res.replies):
            break
    final = _query(ctx, "kmeans", {**base, "op": "labels", "centres": loop.centres}, nodes)
    summary = {
        "features": features,
        "feature_sources": {s: str(first.replies[s].get("source")) for s in sites},
        "k": cfg.k,
        "init": cfg.init,
        "standardised": cfg.standardise,
        "feature_mean": shift.tolist(),
        "feature_scale": scale.tolist(),
        "initial_centres": init.tolist(),
        "centres": loop.centres.tolist(),
        "centres_original_units": (loop.centres * scale + shift).tolist(),
        "n_iter": loop.n_iter,
        "converged": loop.converged,
        "strict_convergence": loop.strict,
        "withheld_cluster_cells": loop.suppressed,
        "empty_clusters": list(loop.empty),
        "inertia": float(np.sum([float(r["inertia"]) for r in final.replies.values()])),  # type: ignore[arg-type]
        "n_patients": int(sum(int(r["n"]) for r in final.replies.values())),  # type: ignore[call-overload]
    }
    return summary, base, nodes, first.replies


def _cox(ctx: PhaseContext, table: SurvivalTable, survival_payload: dict, nodes: list[int]) -> dict:
    """Cox on cluster membership by federated Newton-Raphson; an ``error`` entry where it is not estimable."""
    groups = [int(g) for g in table.groups]
    if len(groups) < 2:
        return {"error": "fewer than two clusters hold patients"}
    no_events = [g for g, e in zip(groups, table.events, strict=True) if e == 0]
    if no_events:
        return {"error": f"cluster(s) {no_events} have no events; their hazard ratio is not estimable"}
    names = tuple(f"cluster_{g}" for g in groups[1:])
    payload = {**survival_payload, "groups": groups}
    moments = merge_moments(_query(ctx, "survival", {**payload, "op": "cox_moments"}, nodes).replies)
    scale = moments.std(ddof=1)
    tau = table.times[table.observed.sum(axis=0) > 0]

    def evaluate(beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        res = _query(ctx, "survival", {**payload, "op": "cox", "beta": beta, "mean": moments.mean, "scale": scale,
                                       "event_times": tau}, nodes)
        return efron_derivatives(merge_cox_sums(res.replies, tau.size, len(names)), beta)

    result = cox_result(names, newton_raphson(evaluate, len(names)), scale)
    return {"reference": f"cluster_{groups[0]}", "covariates": result.summary(ctx.study.outcomes.alpha),
            "log_likelihood": result.loglik, "n_iter": result.n_iter, "converged": result.converged}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def run(ctx: PhaseContext) -> dict:
    """The whole outcomes phase; returns the JSON-serialisable summary with its artifacts."""
    cfg = ctx.study.outcomes
    kmeans, _, nodes, first = _kmeans(ctx)
    all_exact = all(bool(r.get("exact_outcomes")) for r in first.values())
    mode = EXACT if cfg.exact_times == "auto" and all_exact else BINNED
    survival_payload = {"mode": mode, "time_bin_days": cfg.time_bin_days}
    tables = _query(ctx, "survival", {**survival_payload, "op": "table"}, nodes)
    table = merge_survival_tables(tables.replies)
    curves = {g: kaplan_meier(table, g, cfg.alpha) for g in table.groups}
    test = logrank_test(table) if len(table.groups) >= 2 and table.events.sum() > 0 else None
    try:
        cox = _cox(ctx, table, survival_payload, nodes)
    except ProtocolError as err:
        log.warning("outcomes: Cox model not estimable: %s", err)
        cox = {"error": str(err)}
    groups_out = {}
    for g, km in curves.items():
        groups_out[f"cluster_{g}"] = {
            "n": int(km["at_risk"].iloc[0]), "events": int(km["observed"].sum()),
            "median_survival": _finite(median_survival(km)),
            "timeline": km.index.tolist(), "survival": km["survival"].tolist(),
            "ci_lower": km["ci_lower"].tolist(), "ci_upper": km["ci_upper"].tolist(),
            "at_risk": km["at_risk"].astype(int).tolist(),
        }
    out_dir = ctx.result_dir / "outcomes"
    subtitle = (f"log-rank chi2 = {test.test_statistic:.2f}, df = {test.degrees_of_freedom}, p = {test.p_value:.3g}"
                if test else "log-rank: not computable")
    subtitle += "" if mode == EXACT else f"  (times binned to {cfg.time_bin_days:g} days, small cells merged)"
    png = plot_kaplan_meier({f"cluster {g}": km for g, km in curves.items()}, out_dir / "km_clusters.png",
                            title=f"Overall survival by cluster ({len(first)} sites)", subtitle=subtitle,
                            alpha=cfg.alpha)
    summary = {
        "mode": mode,
        "time_bin_days": cfg.time_bin_days if mode == BINNED else None,
        "sites": sorted(first),
        "suppressed_groups": {s: list(r.get("suppressed_groups", [])) for s, r in tables.replies.items()},  # type: ignore[call-overload]
        "kmeans": kmeans,
        "groups": groups_out,
        "logrank": test.as_dict() if test else None,
        "cox": cox,
    }
    summary_path = out_dir / "outcomes_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    metrics: dict[str, float] = {"n_patients": float(table.n.sum()), "n_events": float(table.events.sum()),
                                 "kmeans_iterations": float(kmeans["n_iter"]), "inertia": kmeans["inertia"]}
    if test:
        metrics.update(logrank_chi2=test.test_statistic, logrank_p=test.p_value)
    for name, cov in cox.get("covariates", {}).items():
        metrics[f"cox_coef_{name}"] = cov["coef"]
        metrics[f"cox_hr_{name}"] = cov["hazard_ratio"]
    for name, grp in groups_out.items():
        if grp["median_survival"] is not None:
            metrics[f"median_survival_{name}"] = grp["median_survival"]
    sources = set(kmeans["feature_sources"].values())
    parent = PARENT_KIND.get(sources.pop()) if len(sources) == 1 else None
    settings_hash = sha256_json(cfg.model_dump(mode="json"))
    artifacts = []
    for path in (summary_path, png):
        art = {"kind": "outcomes", "path": str(path), "round": None, "metrics": {"pooled": metrics},
               "settings_hash": settings_hash}
        if parent:
            art["parent_kind"] = parent
        artifacts.append(art)
    ctx.participants["outcomes"] = {s: int(r["n"]) for s, r in tables.replies.items()}  # type: ignore[call-overload]
    return {**{k: v for k, v in summary.items() if k != "groups"},
            "groups": {g: {k: v for k, v in d.items() if k in ("n", "events", "median_survival")}
                       for g, d in groups_out.items()},
            "artifacts": artifacts}
