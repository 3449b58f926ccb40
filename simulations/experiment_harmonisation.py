"""The harmonisation-effect experiment: the same federated classifier without and with harmonisation.

Sites (:mod:`simulations.harmonisation_sites`) are split by field strength (1.5T and 3T scanners of different
vendors) with a subtype whose image signal the scanners shift and scale, and a prevalence that differs by field
strength. Conditions (``experiment.conditions``):

* ``none``: compact radiomics of the raw images;
* ``image``: the same after image-level standardisation in each image's foreground (z-score, or Nyúl with the
  standard scale learnt federatedly from the training cases' landmarks, :mod:`common.nyul`);
* ``combat``: raw-image features harmonised by federated ComBat (:func:`common.harmonisation.federated_combat`,
  each site one batch, no covariates -- the label is never used);
* ``both``: image standardisation, then ComBat.

ComBat is fitted on every case of each site (training and held-out alike): it uses no label, so this is
transductive harmonisation, as a site would run it on its whole cohort before any model is trained. The
classifier (``experiment.model``) is trained by FedAvg on the training cases and evaluated on the held-out cases
of each site by the classifier protocol's driver (:func:`common.classifier.protocol.run_classifier` over
in-memory sites) with the aggregate metrics of :mod:`common.classifier.metrics`; every metric is reported per
condition for the pool (with a bootstrap CI), each site, each vendor and each field strength.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from common.config import StudyConfig
from common.protocol import Payload
from common.sitedata import Site, SitePolicy

log = logging.getLogger(__name__)
CONDITION_LABELS = {"none": "no harmonisation", "image": "image standardisation", "combat": "federated ComBat",
                    "both": "image standardisation + ComBat"}
TABLE_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "brier")


@dataclass
class ExperimentResult:
    """The experiment's table (one row per condition and group), summaries, and written files."""

    rows: list[dict[str, Any]]
    summaries: dict[str, dict]
    files: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def pooled(self, condition: str, metric: str = "auc") -> float:
        """The pooled value of ``metric`` under ``condition``."""
        return float(next(r[metric] for r in self.rows if r["condition"] == condition and r["group"] == "pooled"))


def experiment_sites(study: StudyConfig, out: Path) -> list[Path]:
    """Simulate the experiment's hospitals (``study.experiment``) under ``out``."""
    from simulations.harmonisation_sites import EffectDesign, simulate_experiment_sites

    e = study.experiment
    design = EffectDesign(enhancement=e.enhancement, t2_shift=e.t2_shift, biological_sd=e.biological_sd,
                          prevalence_1_5t=e.prevalence_1_5t, prevalence_3t=e.prevalence_3t,
                          cet1_gain_1_5t=e.cet1_gain_1_5t, scanner_strength=e.scanner_strength)
    return simulate_experiment_sites(out, sites=e.sites, patients=e.patients, size=e.size, seed=e.seed, design=design)


def _site_features(args: tuple[Path, tuple[str, ...], str, dict | None]) -> pd.DataFrame:
    from client.classifier.features import compact_features
    from common.validation import load_site

    site_dir, sequences, method, nyul = args
    site = load_site(site_dir)
    return compact_features(site.cases, sequences, method, nyul)


def nyul_scale(sites: Sequence[Site], study: StudyConfig) -> dict:
    """The federated Nyúl standard scale from every site's training cases: the classifier's ``classifier_nyul``
    round (the sites' own step, :func:`client.steps.classifier.nyul_step`) over the sites in memory."""
    from client.steps.classifier import nyul_step
    from common.classifier.protocol import NYUL
    from common.classifier.protocol import nyul_scale as federated_nyul_scale
    from common.protocol import InMemoryQuery

    def step(site: Site, payload: Payload) -> Payload:
        return nyul_step(site, study, payload)

    query = InMemoryQuery({s.site_id: s for s in sites}, {NYUL: step})
    return json.loads(federated_nyul_scale(query, study.sequences))


def site_feature_tables(sites: Sequence[Site], study: StudyConfig, method: str, nyul: dict | None = None,
                        workers: int = 1) -> dict[str, pd.DataFrame]:
    """Compact radiomics of every site's cases after ``method`` ("none", "zscore", "nyul"), by site id."""
    jobs = [(s.root, tuple(study.sequences), method, nyul) for s in sites]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            frames = list(pool.map(_site_features, jobs))
    else:
        frames = [_site_features(j) for j in jobs]
    return {s.site_id: f for s, f in zip(sites, frames, strict=True)}


def _rows(condition: str, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    def row(group: str, kind: str, m: Mapping[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {"condition": condition, "group": group, "group_kind": kind, "n": int(m["n"])}
        for k in TABLE_METRICS:
            out[k] = float(m[k])
            if f"{k}_lo" in m:
                out[f"{k}_lo"], out[f"{k}_hi"] = float(m[f"{k}_lo"]), float(m[f"{k}_hi"])
        return out

    rows = [row("pooled", "pooled", summary["pooled"])]
    rows += [row(s, "site", m) for s, m in summary["per_site"].items()]
    for attr in ("vendor", "field_strength"):
        for level, m in summary["fairness"].get(attr, {}).get("levels", {}).items():
            rows.append(row(f"{attr}={level}", attr, m))
    return rows


def run_harmonisation_experiment(study: StudyConfig, out: Path, site_dirs: Sequence[Path] | None = None
                                 ) -> ExperimentResult:
    """Run every condition of ``study.experiment``; writes table (CSV, Markdown), plot and summary under ``out``."""
    from client.classifier.data import site_labels
    from client.classifier.memory import CLASSIFIER_STEPS, feature_site_arrays, memory_sites
    from common.classifier.protocol import run_classifier
    from common.harmonisation import federated_combat
    from common.protocol import InMemoryQuery
    from common.validation import load_site

    e = study.experiment
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    dirs = list(site_dirs) if site_dirs is not None else experiment_sites(study, out / "sites")
    seconds["simulate"] = time.perf_counter() - t0
    sites = [load_site(d) for d in dirs]
    labels = {s.site_id: site_labels(s, study.classifier.label) for s in sites}
    clinical = {s.site_id: s.clinical_frame() for s in sites}
    attributes = {s.site_id: {"vendor": s.config.require_scanner().vendor,
                              "field_strength": f"{s.config.require_scanner().field_strength:g}T"} for s in sites}
    min_cohort = min(s.config.policy.min_cohort for s in sites)
    needs_raw = any(c in ("none", "combat") for c in e.conditions)
    needs_std = any(c in ("image", "both") for c in e.conditions)
    tables: dict[str, dict[str, pd.DataFrame]] = {}
    t = time.perf_counter()
    if needs_raw:
        tables["raw"] = site_feature_tables(sites, study, "none", workers=e.workers)
    if needs_std:
        nyul = nyul_scale(sites, study) if e.image_standardisation == "nyul" else None
        tables["std"] = site_feature_tables(sites, study, e.image_standardisation, nyul, workers=e.workers)
    seconds["features"] = time.perf_counter() - t
    rows: list[dict[str, Any]] = []
    summaries: dict[str, dict] = {}
    for cond in e.conditions:
        t = time.perf_counter()
        feats = tables["std" if cond in ("image", "both") else "raw"]
        if cond in ("combat", "both"):
            feats = federated_combat(feats, eb=e.combat_eb, parametric=e.combat_parametric)
        arrays = feature_site_arrays(feats, labels, study.classifier, clinical, attributes)
        # synthetic sites: the experiment measures the harmonisation effect on exact (uncoarsened) evaluations
        exact = SitePolicy(min_cohort=min_cohort, exact_outcomes=True)
        query = InMemoryQuery(memory_sites(arrays, study.classifier, min_cohort=min_cohort, policy=exact),
                              CLASSIFIER_STEPS)
        run = run_classifier(query, e.model, study.classifier)
        summaries[cond] = run.summary
        rows += _rows(cond, run.summary)
        seconds[cond] = time.perf_counter() - t
        log.info("condition %-6s: pooled AUC %.3f, accuracy %.3f (%.1fs)", cond, run.summary["pooled"]["auc"],
                 run.summary["pooled"]["accuracy"], seconds[cond])
    result = ExperimentResult(rows, summaries, seconds=seconds)
    result.files = write_report(result, study, out)
    return result


def markdown_table(rows: Sequence[Mapping[str, Any]], groups: Sequence[str] | None = None) -> str:
    """AUC and accuracy (95% CI for the pool) per condition and group, as Markdown."""
    lines = ["| condition | group | n | AUC | accuracy | sensitivity | specificity | Brier |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if groups is not None and r["group_kind"] not in groups:
            continue

        def ci(m: str, r: Mapping[str, Any] = r) -> str:
            v = r[m]
            return f"{v:.3f} ({r[m + '_lo']:.3f}-{r[m + '_hi']:.3f})" if f"{m}_lo" in r and r["group"] == "pooled" \
                else f"{v:.3f}"

        lines.append(f"| {CONDITION_LABELS.get(r['condition'], r['condition'])} | {r['group']} | {r['n']} | "
                     f"{ci('auc')} | {ci('accuracy')} | {r['sensitivity']:.3f} | {r['specificity']:.3f} | "
                     f"{r['brier']:.3f} |")
    return "\n".join(lines) + "\n"


def write_report(result: ExperimentResult, study: StudyConfig, out: Path) -> dict[str, str]:
    """The experiment's files: table.csv, table.md, harmonisation.png, summary.json."""
    from common.classifier.fairness import gap_table
    from server.figures.classifier import condition_plot

    csv = out / "table.csv"
    result.table().to_csv(csv, index=False, float_format="%.6g")
    md = out / "table.md"
    gaps = []
    for cond, summary in result.summaries.items():
        for g in gap_table({k: v for k, v in summary["fairness"].items() if k in ("vendor", "field_strength")}):
            if g["metric"] in ("auc", "accuracy"):
                gaps.append({"condition": cond, **g})
    gap_lines = ["| condition | attribute | metric | worst | best | gap |", "|---|---|---|---|---|---|"]
    gap_lines += [f"| {g['condition']} | {g['attribute']} | {g['metric']} | {g['worst']} ({g['worst_value']:.3f}) | "
                  f"{g['best']} ({g['best_value']:.3f}) | {g['gap']:.3f} |" for g in gaps]
    md.write_text(f"# Harmonisation effect ({study.name}, study {study.hash[:12]})\n\n"
                  f"Model: {study.experiment.model}; image standardisation: {study.experiment.image_standardisation}"
                  f"; {study.experiment.sites} sites x {study.experiment.patients} patients.\n\n"
                  + markdown_table(result.rows) + "\n## Worst-group gaps (FUTURE-AI F3)\n\n" + "\n".join(gap_lines)
                  + "\n")
    plot = condition_plot(result.rows, out / "harmonisation.png")
    summary_file = out / "summary.json"
    summary_file.write_text(json.dumps({"study_hash": study.hash, "rows": result.rows, "seconds": result.seconds,
                                   "gaps": gaps,
                                   "shap_top": {c: s.get("shap", {}).get("features", [])[:5]
                                                for c, s in result.summaries.items()}}, indent=1, default=str))
    return {"csv": str(csv), "markdown": str(md), "plot": str(plot), "summary": str(summary_file)}
