"""The report phase: one self-contained HTML report of the whole study, for clinicians and auditors.

It runs last. It reads the earlier phases' outputs, asks the sites for per-feature moments before and after
harmonisation (aggregates only), draws what is better looked at than read, and adds the registry's lineage
of this run's model versions with the result of ``verify``. Every section is present; a phase that did not
run says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from common.maps.habitats import PREFIX as HABITAT_PREFIX
from common.maps.layout import is_map
from common.report import run_report
from server.phases.base import PhaseContext
from server.registry.verify import format_head
from server.report import Section, build_report
from server.report.html import table

log = logging.getLogger("fedbiopsy.server")
SECTIONS: tuple[tuple[str, str], ...] = (
    ("cohort", "Cohort per site"),
    ("preprocessing", "Preprocessing effect"),
    ("segmentation", "Tumour segmentation"),
    ("variability", "Segmentation study: radiologists vs the model"),
    ("harmonisation", "Feature harmonisation (federated ComBat)"),
    ("signature", "Image-based signature"),
    ("outcomes", "Clusters and survival"),
    ("classifier", "Classifier performance and fairness"),
    ("explainability", "Explainability"),
    ("privacy", "Privacy budget"),
    ("lineage", "Model lineage (registry)"),
)


def _fig(out: dict | None, *keys: str) -> list[Path]:
    """PNG paths found under ``out['figures']`` (any nesting) whose key contains one of ``keys``."""
    found: list[Path] = []

    def walk(node: Any, name: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{name}/{i}")
        elif isinstance(node, str) and node.endswith(".png") and (not keys or any(k in name for k in keys)):
            found.append(Path(node))

    walk(out or {})
    return sorted(set(found), key=str)


def _cohort(ctx: PhaseContext) -> Section:
    fp = ctx.outputs.get("fingerprint")
    if not fp:
        return Section("cohort", "Cohort per site", ran=False)
    rows = []
    for site, n in sorted(fp["cases_per_site"].items()):
        scanner = fp.get("scanners", {}).get(site, {})
        manifest = (fp.get("data_fingerprints", {}).get(site) or {}).get("manifest_hash", "")
        rows.append({"site": site, "cases": n, "vendor": scanner.get("vendor", ""),
                     "field strength (T)": scanner.get("field_strength", ""), "data fingerprint": manifest[:12]})
    body = table(rows) + (f"<p>{fp['n_cases']} cases over {fp['n_sites']} sites; target spacing "
                          f"{[round(s, 3) for s in fp['target_spacing']]} mm.</p>")
    if fp.get("refused"):
        body += f"<p>Refused: {_escape(json.dumps(fp['refused']))}</p>"
    return Section("cohort", "Cohort per site", body)


def _preprocessing(ctx: PhaseContext) -> Section:
    pre = ctx.outputs.get("preprocessing")
    if not pre:
        return Section("preprocessing", "Preprocessing effect", ran=False)
    effect = pre.get("effect") or {}
    rows = [{"sequence": seq, "site-median spread before": v["before"], "after": v["after"], "shrink (x)": v["shrink"]}
            for seq, v in effect.get("spread", {}).items()]
    body = (f"<p>Plan <code>{_escape(str(pre['plan_sha256'])[:12])}</code>: steps "
            f"{_escape(str(pre['plan']['preprocessing']['steps']))}, target spacing "
            f"{_escape(str(pre['plan']['target_spacing']))} mm, delivered to {len(pre['delivered_to'])} site(s).</p>"
            + table(rows) + "<p class='muted'>Spread: SD of the sites' median foreground intensity over the "
            "pooled inter-quartile range, from each site's cohort histogram.</p>")
    return Section("preprocessing", "Preprocessing effect", body,
                   [(p, "Foreground intensity per site, before and after preprocessing") for p in _fig(effect)])


def _segmentation(ctx: PhaseContext) -> Section:
    seg = ctx.outputs.get("segmentation")
    if not seg:
        return Section("segmentation", "Tumour segmentation", ran=False)
    final = seg["rounds"][-1] if seg.get("rounds") else {}
    rows = []
    for site, summary in sorted((final.get("sites") or {}).items()):
        row: dict[str, Any] = {"site": site}
        for metric in ("dsc", "auc", "fpr", "fnr", "hd95"):
            stats = summary.get(metric) if isinstance(summary, dict) else None
            if isinstance(stats, dict):
                row[f"{metric} median"] = stats.get("median")
        rows.append(row)
    body = (f"<p>Network {_escape(str(seg.get('network')))} ({_escape(str(seg.get('n_parameters')))} parameters), "
            f"strategy {_escape(str(seg.get('strategy')))}, {len(seg.get('rounds', [])) - 1} round(s). Median DSC "
            f"{_num(seg.get('initial_dsc_median'))} (initial) to {_num(seg.get('final_dsc_median'))} (final).</p>"
            + table(rows))
    inference = ctx.outputs.get("inference")
    if inference:
        body += (f"<p>Cases without a radiologist's mask segmented locally by the final model: "
                 f"{_escape(str(inference['segmented_per_site']))} (empty predictions: "
                 f"{_escape(str(inference['empty_per_site']))}); their "
                 f"masks stay at the sites and feed the features phase.</p>")
    body += ("<p class='muted'>Overlays of prediction vs ground truth are written at each site "
             "(<code>derived/segmentation/</code>) and never leave it.</p>")
    gap = seg.get("centralised")
    if isinstance(gap, dict):
        body += "<p>Centralised baseline: " + _escape(json.dumps(gap, default=str)[:600]) + "</p>"
    return Section("segmentation", "Tumour segmentation", body,
                   [(p, p.stem.replace("_", " ")) for p in _fig(seg)][:6])


def _variability(ctx: PhaseContext) -> Section:
    title = "Segmentation study: radiologists vs the model"
    study = (ctx.outputs.get("inference") or {}).get("segmentation_study")
    if not study:
        return Section("variability", title, ran=False)
    body = ("<p>As in the seed's study: every case's value is the mean over its rater pairs (inter-observer) or "
            "over its raters (automatic: the final model on held-out cases it was never trained on), compared on "
            "the site's own grid; FPR = FP/(TP+FN), FNR = FN/(TP+FN). Each site sends only summaries over at "
            "least <code>min_cohort</code> cases; n, mean and SD are exact over the pooled cases, median and IQR "
            "the case-weighted mean of the sites'. A site with fewer than 4 &times; its smallest cell + 2 cases "
            "sends its mean for every quartile (an IQR of 0 there), so that no quartile is a few cases' "
            "values.</p>")
    for name in ("inter", "auto"):
        t = study["tables"][name]
        body += f"<h3>{_escape(t['title'])} (n={t['n_cases']}, sites {_escape(', '.join(t['sites']) or '-')})</h3>"
        body += table(t["rows"]) if t["rows"] else "<p class='muted'>Withheld: no site had enough rated cases.</p>"
    lev = study.get("time_leverage")
    times = f"{lev:.0f}" if isinstance(lev, (int, float)) else "n/a"
    body += (f"<p>Time leverage: the model takes {_num(study.get('model_seconds_per_case'))} s per case "
             f"(over {study.get('timed_cases', 0)} case(s), on the sites' hardware) against "
             f"{_num(study.get('manual_seconds_per_case'))} s of manual segmentation: "
             f"{times}&times; faster.</p>"
             "<p class='muted'>Mask comparison images (rater, model, false positives and negatives, three planes) "
             "are written at each site under <code>derived/segmentation/comparison-*</code> and never leave it.</p>")
    return Section("variability", title, body, [(p, "variability") for p in _fig(study)])


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"


def _harmonisation(ctx: PhaseContext) -> Section:
    harm = ctx.outputs.get("harmonisation")
    if not harm:
        return Section("harmonisation", "Feature harmonisation (federated ComBat)", ran=False)
    figures: list[tuple[Path, str]] = []
    body = (f"<p>{_escape(str(harm['n_features']))} features, {_escape(str(harm['n_cases']))} cases, batches "
            f"{_escape(str(harm['batches']))}; options {_escape(str(harm['options']))}; rounds "
            f"{_escape(str(harm['rounds']))}.</p>")
    model = _combat_model(ctx)
    shifted = _shift_features(*model) if model else []
    maps = _map_features(ctx, model[0]) if model else []
    columns = maps + [c for c in shifted if c not in maps]
    if columns:
        replies = run_report(ctx.query(), columns)
        path, rows = _plot_moments(replies, columns, ctx.result_dir / "report" / "features_combat.png")
        what = (f"the parametric maps' tumour medians ({', '.join(maps)}) and " if maps else "")
        figures.append((path, f"Per-site mean ± SD of {what}the features ComBat shifts most (pooled z-units), "
                              "before and after ComBat"))
        body += table(rows) + ("<p class='muted'>Between-site spread: SD of the site means in pooled SD units "
                               "(aggregates per site only).</p>")
    return Section("harmonisation", "Feature harmonisation (federated ComBat)", body, figures)


def _combat_model(ctx: PhaseContext) -> tuple[list[str], np.ndarray] | None:
    """The stored ComBat model's feature names and batch location effects (gamma*); None if unreadable."""
    try:
        data = np.load(ctx.outputs["harmonisation"]["model"], allow_pickle=False)
        names = [str(n) for n in json.loads(str(data["meta"]))["spec"]["features"]]
        return names, np.asarray(data["gamma_star"], dtype=float)
    except (KeyError, OSError, ValueError) as exc:
        log.warning("report: cannot read the ComBat model (%s); feature distributions left out", exc)
        return None


def _map_features(ctx: PhaseContext, names: list[str]) -> list[str]:
    """The tumour median of each parametric map of the study (``ADC_original_firstorder_Median``, ...) that the
    ComBat model harmonised: their per-site distributions before and after harmonisation go into the report."""
    wanted = [f"{c}_original_firstorder_Median" for c in ctx.study.channels if is_map(c)]
    return [w for w in wanted if w in set(names)]


def _shift_features(names: list[str], gamma: np.ndarray, k: int = 6) -> list[str]:
    """The features ComBat corrects most in location according to the stored model (largest |gamma*|)."""
    order = np.argsort(-np.abs(gamma).max(axis=0))
    return [names[i] for i in order[:k]]


def _plot_moments(replies: dict[str, dict], columns: list[str], out: Path) -> tuple[Path, list[dict]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted(replies)
    ncols = min(5, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.ravel()[len(columns):]:
        ax.set_visible(False)
    rows = []
    for j, col in enumerate(columns):
        ax = axes[j // ncols][j % ncols]
        row: dict[str, Any] = {"feature": col}
        for k, key in enumerate(("before", "after")):
            n = np.array([replies[s][f"{key}/n"] for s in sites], dtype=float)
            mu = np.array([replies[s][f"{key}/mean"][j] for s in sites])
            sd = np.array([replies[s][f"{key}/sd"][j] for s in sites])
            grand = (n @ mu) / n.sum()
            pooled_sd = np.sqrt((((n - 1) * sd**2).sum() + (n * (mu - grand) ** 2).sum()) / (n.sum() - 1))
            z, zs = (mu - grand) / pooled_sd, sd / pooled_sd
            ax.errorbar(np.arange(len(sites)) + 0.18 * (2 * k - 1), z, yerr=zs, fmt="o", capsize=3, label=key)
            row[f"spread {key}"] = float(np.std(z, ddof=1)) if len(sites) > 1 else 0.0
        rows.append(row)
        ax.set_xticks(range(len(sites)), sites, rotation=45, fontsize=7)
        ax.set_title(col.replace("_original_", "\n"), fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
    axes[0][0].legend(fontsize=7)
    axes[0][0].set_ylabel("z (pooled)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out, rows


def _signature(ctx: PhaseContext) -> Section:
    red = ctx.outputs.get("reduction")
    if not red:
        return Section("signature", "Image-based signature", ran=False)
    body = (f"<p>{len(red['kept'])} features kept of {len(red['kept']) + len(red['dropped'])} "
            f"(low variance / correlation pruning); factors: {_escape(str(list(red['explained_variance'])))}.</p>")
    rows = [{"factor": f, "explained variance": v, "top features": ", ".join(map(str, red["top_features"][f][:3]))}
            for f, v in red["explained_variance"].items()]
    body += table(rows)
    by_channel = _kept_by_channel(ctx, [str(k) for k in red["kept"]])
    if by_channel:
        body += ("<p>Kept features per channel:</p>"
                 + table([{"channel": c, "kind": "parametric map" if is_map(c) else "habitat fractions"
                           if c == HABITAT_PREFIX else "sequence", "kept": n} for c, n in by_channel.items()]))
    figures = []
    try:
        data = np.load(red["signature"], allow_pickle=False)
        meta = json.loads(str(data["meta"]))
        path = _plot_loadings(np.asarray(data["loadings"]), meta["kept"], meta["factors"],
                              ctx.result_dir / "report" / "signature_loadings.png")
        figures.append((path, "Factor loadings of the kept features (varimax)"))
    except (KeyError, OSError, ValueError) as exc:
        log.warning("report: cannot read the signature (%s)", exc)
    return Section("signature", "Image-based signature", body, figures)


def _kept_by_channel(ctx: PhaseContext, kept: list[str]) -> dict[str, int]:
    """How many kept features come from each channel of the study (and from the tumour habitats)."""
    counts: dict[str, int] = {}
    for channel in (*ctx.study.channels, HABITAT_PREFIX):
        n = sum(k.startswith(f"{channel}_") for k in kept)
        if n:
            counts[channel] = n
    return counts


def _plot_loadings(loadings: np.ndarray, features: list[str], factors: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = np.argsort(-np.abs(loadings).max(axis=1))[:25]
    fig, ax = plt.subplots(figsize=(6, 0.28 * len(top) + 1.5))
    im = ax.imshow(loadings[top], cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_yticks(range(len(top)), [features[i].replace("_original", "") for i in top], fontsize=7)
    ax.set_xticks(range(len(factors)), factors, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.6, label="loading")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _outcomes(ctx: PhaseContext) -> Section:
    out = ctx.outputs.get("outcomes")
    if not out:
        return Section("outcomes", "Clusters and survival", ran=False)
    lr = out["logrank"]
    rows = [{"group": g, **{k: v for k, v in (info or {}).items() if isinstance(v, (int, float, str))}}
            for g, info in (out.get("groups") or {}).items()]
    body = (f"<p>k-means into {out['kmeans']['k']} clusters on {len(out['kmeans']['features'])} signature "
            f"scores; times {_escape(str(out['mode']))}"
            f"{' to ' + str(out['time_bin_days']) + ' days' if out['mode'] != 'exact' else ''}. Log-rank "
            f"chi2 = {lr['test_statistic']:.3f}, p = {lr['p_value']:.4g}.</p>" + table(rows))
    cox = out.get("cox") or {}
    cox_rows = [{"covariate": c, **v} for c, v in (cox.get("covariates") or {}).items()]
    if cox_rows:
        body += "<p>Cox proportional hazards (reference " + str(cox.get("reference")) + "):</p>" + table(cox_rows)
    figs = [a["path"] for a in out.get("artifacts", []) if str(a.get("path", "")).endswith(".png")]
    return Section("outcomes", "Clusters and survival", body,
                   [(Path(p), "Kaplan-Meier curves per cluster with 95% CI and numbers at risk") for p in figs])


def _classifier(ctx: PhaseContext) -> Section:
    clf = ctx.outputs.get("classifier")
    if not clf:
        return Section("classifier", "Classifier performance and fairness", ran=False)
    body = "<p>Pooled held-out metrics per model (from the sites' aggregated score histograms):</p>"
    body += table(clf.get("comparison") or [])
    gaps = clf.get("fairness_gaps") or []
    if gaps:
        body += "<p>Fairness (FUTURE-AI F3): the worst group against the best, per attribute and metric:</p>"
        body += table(gaps)
    figs = [p for p in _fig(clf) if "shap" not in p.name and "gradcam" not in p.name.lower()]
    return Section("classifier", "Classifier performance and fairness", body, [(p, p.stem) for p in figs])


def _escape(text: str) -> str:
    import html

    return html.escape(text)


def _explainability(ctx: PhaseContext) -> Section:
    clf = ctx.outputs.get("classifier")
    if not clf:
        return Section("explainability", "Explainability", ran=False)
    figs = [p for p in _fig(clf) if "shap" in p.name or "gradcam" in p.name.lower()]
    return Section("explainability", "Explainability",
                   "<p>Federated mean |SHAP| per feature (sites send sums of |SHAP| only) and Grad-CAM "
                   "overlays of the image classifier.</p>", [(p, p.stem) for p in figs])


def _privacy(ctx: PhaseContext) -> Section:
    rows = []
    for phase in ("segmentation", "classifier"):
        eps = (ctx.outputs.get(phase) or {}).get("epsilon")
        if isinstance(eps, dict):
            for site, value in sorted(eps.items()):
                rows.append({"phase": phase, "site": site, "epsilon": value})
    body = ("<p>No image, no patient-level row and no per-case value left any site: every reply is an aggregate "
            "over at least the site's <code>min_cohort</code> patients, or the site refused.</p>")
    body += table(rows) if rows else "<p>No differentially private training in this study (epsilon not spent).</p>"
    return Section("privacy", "Privacy budget", body)


def _lineage(ctx: PhaseContext) -> Section:
    reg = ctx.registry
    if reg is None:
        return Section("lineage", "Model lineage (registry)", ran=False)
    versions = reg.versions(run_id=ctx.run_id)
    rows = [{"version": v.label, "kind": v.kind, "phase": v.phase, "round": "" if v.round is None else v.round,
             "parent": f"v{v.parent_id}" if v.parent_id else "", "sites": ", ".join(s.site_id for s in v.sites),
             "artifact sha256": v.artifact_sha256[:12]} for v in versions]
    report = reg.verify()
    status = "verifies" if report.ok else f"does NOT verify: {report.first}"
    body = (f"<p>Registry {reg.location.describe()}: {report.n_events} audit events, {report.n_versions} versions, "
            f"{report.n_artifacts} artifacts; the hash chain {status}. Head when this report was written: "
            f"<code>{_escape(format_head(report.head))}</code>; the head after the run is in "
            "<code>registry-head.txt</code> and <code>study.json</code> (check either with "
            "<code>fedbiopsy registry verify --head</code>).</p>"
            + table(rows))
    return Section("lineage", "Model lineage (registry)", body)


BUILDERS = {
    "cohort": _cohort, "preprocessing": _preprocessing, "segmentation": _segmentation, "variability": _variability,
    "harmonisation": _harmonisation, "signature": _signature, "outcomes": _outcomes,
    "classifier": _classifier, "explainability": _explainability, "privacy": _privacy, "lineage": _lineage,
}


def run(ctx: PhaseContext) -> dict:
    """Build ``report.html`` under the result folder; returns its path and the sections it holds."""
    sections = []
    for sid, title in SECTIONS:
        try:
            section = BUILDERS[sid](ctx)
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the whole report
            log.exception("report: section %s failed", sid)
            section = Section(sid, title, f"<p class='missing'>This section could not be built: "
                                          f"{_escape(type(exc).__name__ + ': ' + str(exc))}</p>")
        section.title = title
        sections.append(section)
    path = build_report(sections, ctx.result_dir / "report.html", f"fedbiopsy study report: {ctx.study.name}",
                        ctx.study.hash)
    log.info("report written to %s", path)
    return {"report": str(path), "sections": [s.id for s in sections],
            "sections_not_run": [s.id for s in sections if not s.ran]}
