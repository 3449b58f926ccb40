"""Server half of the prognosis phase: federated multivariable Cox, its C-index and time-dependent AUC.

The rounds are :func:`common.prognosis.run_prognosis`'s over one fixed cohort of sites. Writes
``prognosis/prognosis.json`` (coefficients on the covariates' own scale, standard errors, p-values, hazard
ratios with their interval, the rounds, the C-index on train and test, pooled and per site, with the error
bound of the risk-score bins, Uno's C, and the AUC and Brier score at each horizon, the calibration by risk
group), ``prognosis/hazard_ratios.png`` and ``prognosis/calibration.png``.
"""

from __future__ import annotations

import json
import logging
import math

from common.config import PrognosisConfig
from common.errors import ConfigError
from common.hashing import sha256_json
from common.outcomes import SurvivalOptions
from common.prognosis import Bounded, PrognosisOptions, PrognosisResult, run_prognosis
from server.figures.prognosis import plot_calibration, plot_hazard_ratios
from server.phases.base import PhaseContext

log = logging.getLogger("fedbiopsy.server")


def options_from_config(cfg: PrognosisConfig) -> PrognosisOptions:
    """The server's requests for the study's prognosis section (the covariate spec travels in each request)."""
    if not cfg.covariates:
        raise ConfigError("study config", "prognosis.covariates is empty", "name the covariate columns")
    return PrognosisOptions(penalizer=cfg.penalizer, l1_ratio=cfg.l1_ratio, split=cfg.split_column is not None,
                            survival=SurvivalOptions(time_bin_days=cfg.time_bin_days, alpha=cfg.alpha),
                            exact_if_allowed=cfg.exact_times == "auto", risk_bins=cfg.risk_bins,
                            horizons=tuple(cfg.horizons))


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _bounded(b: Bounded) -> dict:
    return {"value": _num(b.value), "bound": _num(b.bound), "pairs": b.pairs}


def prognosis_summary(result: PrognosisResult, cfg: PrognosisConfig) -> dict:
    """The content of ``prognosis.json``."""
    cox = result.cox
    summary = cox.summary(cfg.alpha)
    split_names = {"all": "train"} if "all" in result.c_index else {}
    c_index: dict = {split_names.get(s, s): b.value if math.isfinite(b.value) else None
                     for s, b in result.c_index.items()}
    c_index.setdefault("test", None)
    c_index["per_site"] = {split_names.get(s, s): {site: _num(b.value) for site, b in sites.items()}
                           for s, sites in result.c_index_sites.items()}
    c_index["bound"] = {split_names.get(s, s): _num(b.bound) for s, b in result.c_index.items()}
    return {
        "covariates": list(cox.names),
        "coefficients": {n: v["coef"] for n, v in summary.items()},
        "se": {n: v["se"] for n, v in summary.items()},
        "p": {n: _num(v["p"]) for n, v in summary.items()},
        "hazard_ratios": {n: {k: v[k] for k in ("hazard_ratio", "hr_lower", "hr_upper")} for n, v in summary.items()},
        "rounds": result.rounds,
        "newton_steps": cox.n_iter,
        "converged": cox.converged,
        "log_likelihood": cox.loglik,
        "penalizer": cfg.penalizer,
        "l1_ratio": cfg.l1_ratio,
        "encoding": cfg.encoding,
        "table": cfg.table,
        "mode": result.mode,
        "time_bin_days": cfg.time_bin_days if result.mode == "binned" else None,
        "sites": list(result.sites),
        "n": {split_names.get(s, s): v for s, v in result.n.items()},
        "events": {split_names.get(s, s): v for s, v in result.events.items()},
        "c_index": c_index,
        "time_dependent_auc": {split_names.get(s, s): {f"{h:g}": _bounded(b) for h, b in by_h.items()}
                               for s, by_h in result.auc.items()},
        "uno_c_index": {split_names.get(s, s): _bounded(b) for s, b in result.uno.items()},
        "brier_score": {split_names.get(s, s): {f"{h:g}": _bounded(b) for h, b in by_h.items()}
                        for s, by_h in result.brier.items()},
        "calibration": {"horizon": result.calibration_horizon,
                        "groups": {split_names.get(s, s): g for s, g in result.calibration.items()}},
        "risk_bins": int(result.edges.size + 1),
        "metric_note": "C-index (Harrell, as lifelines' concordance_index; pairs within a site exact), Uno's C, "
                       "cumulative/dynamic AUC and Brier score (as scikit-survival's, IPCW from the train censoring "
                       "distribution) from the sites' risk tables on shared score bins; 'bound' is the largest "
                       "error the bins allow. Calibration: mean predicted vs Kaplan-Meier survival per risk group",
    }


def run(ctx: PhaseContext) -> dict:
    """The whole prognosis phase; returns the JSON-serialisable summary with its artifacts."""
    cfg = ctx.study.prognosis
    result = run_prognosis(ctx.query(), options_from_config(cfg))
    summary = prognosis_summary(result, cfg)
    out_dir = ctx.result_dir / "prognosis"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "prognosis.json"
    path.write_text(json.dumps(summary, indent=2))
    png = plot_hazard_ratios(summary, out_dir / "hazard_ratios.png", cfg.alpha)
    calibration_png = plot_calibration(summary, out_dir / "calibration.png")
    log.info("prognosis: Cox over %d sites in %d rounds; C-index %s", len(result.sites), result.rounds,
             {k: v for k, v in summary["c_index"].items() if k in ("train", "test")})
    metrics = {f"c_index_{k}": float(v) for k, v in summary["c_index"].items()
               if k in ("train", "test") and v is not None}
    metrics.update({f"cox_coef_{n}": float(v) for n, v in summary["coefficients"].items()})
    settings_hash = sha256_json(cfg.model_dump(mode="json"))
    artifacts = [{"kind": "prognosis", "path": str(p), "round": None, "metrics": {"pooled": metrics},
                  "settings_hash": settings_hash} for p in (path, png, calibration_png) if p is not None]
    ctx.participants["prognosis"] = dict(result.site_n)
    return {**summary, "artifacts": artifacts}
