"""Server half of the outcomes phase: federated k-means, then Kaplan-Meier per cluster, log-rank and Cox.

The rounds are :func:`common.outcomes.run_outcomes`'s (each site keeps its cluster labels; Cox on cluster
membership, cluster 0 the reference), over one fixed cohort: the sites of the first round take part in
every later round and a site dropping out stops the phase. Exact event times are used only when
``outcomes.exact_times`` is "auto" and every site's policy allows them; otherwise binned. Writes
``outcomes/outcomes_summary.json`` and ``outcomes/km_clusters.png`` under the result folder.
"""

from __future__ import annotations

import json
import logging
import math

from common.hashing import sha256_json
from common.outcomes import KMeansResult, OutcomesResult, run_outcomes
from common.survival import BINNED, EXACT, median_survival
from server.figures.survival import plot_kaplan_meier
from server.phases.base import PhaseContext

log = logging.getLogger("fedbiopsy.server")
PARENT_KIND = {"signature_scores.csv": "signature", "features_harmonised.csv": "harmonisation"}


def kmeans_summary(km: KMeansResult) -> dict:
    """The ``kmeans`` entry of the outcomes summary."""
    space, opts = km.space, km.options
    return {
        "features": list(space.features),
        "feature_sources": dict(space.sources),
        "k": opts.k,
        "init": opts.init,
        "standardised": opts.standardise,
        "feature_mean": space.shift.tolist(),
        "feature_scale": space.scale.tolist(),
        "initial_centres": km.initial_centres.tolist(),
        "centres": km.centres.tolist(),
        "centres_original_units": km.centres_original_units.tolist(),
        "n_iter": km.n_iter,
        "converged": km.converged,
        "strict_convergence": km.strict,
        "withheld_cluster_cells": km.suppressed,
        "empty_clusters": list(km.empty),
        "inertia": km.inertia,
        "n_patients": int(sum(km.cases.values())),
        "held_sites": list(km.held),
    }


def cox_summary(result: OutcomesResult, alpha: float) -> dict:
    """The ``cox`` entry: coefficients against the reference cluster, or an ``error`` where not estimable."""
    if result.cox is None:
        return {"error": result.cox_error}
    cox = result.cox
    return {"reference": f"cluster_{result.reference}", "covariates": cox.summary(alpha),
            "log_likelihood": cox.loglik, "n_iter": cox.n_iter, "converged": cox.converged}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def run(ctx: PhaseContext) -> dict:
    """The whole outcomes phase; returns the JSON-serialisable summary with its artifacts."""
    cfg = ctx.study.outcomes
    result = run_outcomes(ctx.query(), cfg)
    survival, table, mode = result.survival, result.survival.table, result.mode
    kmeans = kmeans_summary(result.kmeans)
    cox = cox_summary(result, cfg.alpha)
    test = survival.logrank
    groups_out = {}
    for g, km in survival.curves.items():
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
    sites = result.kmeans.sites
    png = plot_kaplan_meier({f"cluster {g}": km for g, km in survival.curves.items()}, out_dir / "km_clusters.png",
                            title=f"Overall survival by cluster ({len(sites)} sites)", subtitle=subtitle,
                            alpha=cfg.alpha)
    summary = {
        "mode": mode,
        "time_bin_days": cfg.time_bin_days if mode == BINNED else None,
        "sites": sites,
        "suppressed_groups": dict(survival.suppressed_groups),
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
    ctx.participants["outcomes"] = dict(survival.cases)
    return {**{k: v for k, v in summary.items() if k != "groups"},
            "groups": {g: {k: v for k, v in d.items() if k in ("n", "events", "median_survival")}
                       for g, d in groups_out.items()},
            "artifacts": artifacts}
