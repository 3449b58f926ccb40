"""FUTURE-AI model cards, built from registry records only: a JSON-serialisable dict and its Markdown.

The card answers what the registry can evidence (data per site with fingerprints, per-site metrics and the
worst-site gap, scanner coverage, privacy budget, lineage, the audit trail) and marks every FUTURE-AI item
with a status among :data:`server.registry.future_ai.STATUSES`: organisational items are marked as such.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from statistics import fmean
from typing import TYPE_CHECKING, Any

from server.registry.errors import ArtifactError
from server.registry.future_ai import ITEMS
from server.registry.records import Version

if TYPE_CHECKING:
    from server.registry.registry import Registry

CARD_FORMAT = "fedbiopsy-model-card/1"
_LOWER_BETTER = {"fpr", "fnr", "loss", "error", "brier", "hd", "hd95", "hausdorff", "ece", "mae", "rmse", "ibs", "asd"}
_INTENDED = {
    "plan": "Global preprocessing and network plan for the study's federated MRI pipeline (not a clinical model).",
    "segmentation": "Research use: automatic tumour segmentation of MR images for radiomic analysis.",
    "classifier": "Research use: prediction of the tumour subtype from MR imaging features (virtual biopsy).",
    "harmonisation": "Research use: removal of scanner effects from imaging features (ComBat) across sites.",
    "signature": "Research use: a reduced imaging signature (selected features and loadings).",
    "outcomes": "Research use: imaging-based patient clusters and survival analysis.",
    "prognosis": "Research use: a multivariable Cox prognosis model of clinical, genomic and imaging covariates.",
}


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (error rates, losses, distances)."""
    return any(tok in _LOWER_BETTER for tok in re.split(r"[^a-z0-9]+", metric.lower()))


def _fairness(metrics: Mapping[str, Mapping[str, float | None]]) -> dict[str, Any]:
    per_metric: dict[str, dict[str, float]] = {}
    for site, values in metrics.items():
        if site == "pooled":
            continue
        for name, value in values.items():
            if value is not None:
                per_metric.setdefault(name, {})[site] = float(value)
    out = {}
    for name, by_site in sorted(per_metric.items()):
        if len(by_site) < 2:
            continue
        low = lower_is_better(name)
        ranked = sorted(by_site.items(), key=lambda kv: kv[1], reverse=not low)
        (best, bv), (worst, wv) = ranked[0], ranked[-1]
        out[name] = {"higher_is_better": not low, "best": {"site": best, "value": bv},
                     "worst": {"site": worst, "value": wv}, "gap": abs(bv - wv)}
    return out


def _by_group(metrics: Mapping[str, Mapping[str, float | None]], scanners: Mapping[str, Mapping[str, Any]],
              key: str) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, list[float]]] = {}
    for site, values in metrics.items():
        if site == "pooled" or site not in scanners:
            continue
        g = str(scanners[site].get(key))
        for name, value in values.items():
            if value is not None:
                groups.setdefault(g, {}).setdefault(name, []).append(float(value))
    return {g: {m: fmean(v) for m, v in sorted(d.items())} for g, d in sorted(groups.items())}


def _plan(registry: Registry, v: Version) -> tuple[dict[str, Any] | None, str | None]:
    plan_id = v.id if v.kind == "plan" else v.plan_id
    if plan_id is None:
        return None, "no plan version in this version's run"
    try:
        return json.loads(registry.artifact_bytes(plan_id)), None
    except ArtifactError as exc:
        return None, f"the plan v{plan_id} cannot be read: {exc}"
    except ValueError:
        return None, f"the plan v{plan_id} is not JSON"


def _item(status: str, evidence: str) -> dict[str, str]:
    return {"status": status, "evidence": evidence}


def model_card(registry: Registry, ref: str | int) -> dict[str, Any]:
    """The FUTURE-AI model card of a version, as a JSON-serialisable dict."""
    v = registry.version(ref)
    lineage = registry.lineage(v.id)
    plan, plan_note = _plan(registry, v)
    scanners: dict[str, dict[str, Any]] = dict((plan or {}).get("scanners") or {})
    config = registry.study_config(v.study_hash)
    intended = str((config.get("registry") or {}).get("intended_use") or "").strip()
    report = registry.verify(artifacts={x.artifact_sha256 for x in lineage})  # the chain, records, own artifacts
    events = registry.events()
    own = next((e for e in events if e.kind == "version.registered" and e.subject == f"version:{v.id}"), None)
    study_event = next((e for e in events if e.kind == "study.recorded"
                        and (e.payload.get("record") or {}).get("config_hash") == v.study_hash), None)
    history = registry.versions(kind=v.kind)

    contributors = set(v.site_ids)
    site_metrics = {s: m for s, m in v.metrics.items() if s != "pooled"}
    external = sorted(set(site_metrics) - contributors)
    fairness = _fairness(v.metrics)
    by_vendor = _by_group(v.metrics, scanners, "vendor")
    by_field = _by_group(v.metrics, scanners, "field_strength")
    data_sites = [{"site_id": s.site_id, "n_cases": s.n_cases, "manifest_cases": s.manifest_cases,
                   "manifest_hash": s.manifest_hash, "vendor": scanners.get(s.site_id, {}).get("vendor"),
                   "field_strength": scanners.get(s.site_id, {}).get("field_strength")} for s in v.sites]
    trained_scanners = sorted({f"{d['vendor']} {d['field_strength']}T" for d in data_sites if d["vendor"]})
    eps = {s: float(e) for s, e in v.epsilon.items()}
    xai = [str(x) for x in v.extra.get("explainability", [])] if isinstance(v.extra.get("explainability"), list) else []

    limitations = [f"{'Computed' if v.kind == 'plan' else 'Trained'} on {len(v.sites)} site(s), "
                   f"{sum(s.n_cases for s in v.sites)} case(s) in total."]
    if not site_metrics:
        limitations.append("No per-site metrics were registered with this version.")
    if not external:
        limitations.append("No external validation: no site outside the training sites was evaluated.")
    if not eps:
        limitations.append("No differential privacy was applied to this version (only site-side aggregation).")
    if any(s.manifest_hash is None for s in v.sites):
        limitations.append("Some sites sent no data manifest hash: their data version cannot be pinned.")
    if plan_note:
        limitations.append(f"Scanner attributes unavailable: {plan_note}.")
    if not report.ok:
        limitations.append(f"The registry does NOT verify: {report.first}.")
    limitations.append("Organisational FUTURE-AI items (below) are outside what the registry can evidence.")

    coverage = f"scanners of contributing sites: {', '.join(trained_scanners) or 'unknown'}"
    items = {
        "F1": _item("partly evidenced" if scanners else "not evidenced",
                    "attributes recorded for every site: site, scanner vendor, field strength; the bias inventory "
                    "itself is organisational"),
        "F2": _item("partly evidenced", f"per-site case counts and data-manifest hashes for {len(v.sites)} site(s), "
                    "scanner attributes; demographic coverage is not aggregated by the registry"),
        "F3": (_item("partly evidenced", "per-site metrics with the worst-site gap: " + "; ".join(
            f"{m} gap {f['gap']:.3g} (worst {f['worst']['site']})" for m, f in fairness.items())
            + "; per-subgroup metrics and debiasing are not registered")
            if fairness else _item("not evidenced", "fewer than two sites with metrics")),
        "Un1": _item("organisational", f"the intended settings are organisational; {coverage}"),
        "Un2": _item("not evidenced", "metric names are stored, not their definitions or data-standard reports"),
        "Un3": (_item("evidenced", f"metrics on site(s) not used in training: {', '.join(external)}") if external
                else _item("not evidenced", "every evaluated site also contributed to training")),
        "Un4": (_item("partly evidenced", f"local metrics for site(s) {', '.join(sorted(site_metrics))}; "
                      "recalibration and comparison with local clinicians are organisational")
                if site_metrics else _item("not evidenced", "no per-site metrics")),
        "T1": _item("organisational", "risk file"),
        "T2": _item("evidenced", "this card, generated from registry records: data provenance, configuration hash, "
                    "code version, metrics, lineage"),
        "T3": _item("not evidenced", "site-side validation rejects unusable cases, but its QC figures are not "
                    "registered with the version"),
        "T4": _item("partly evidenced", f"registry history: {len(history)} version(s) of kind {v.kind}; scheduled "
                    "re-audits are organisational"),
        "T5": _item("evidenced" if report.ok else "not evidenced",
                    f"hash-chained audit log of {report.n_events} event(s); this version is event "
                    f"#{own.seq if own else '?'}; chain {'verifies' if report.ok else 'BROKEN: ' + str(report.first)}"),
        "T6": _item("organisational", "no sign-off or override records for this version"),
        "Us1": _item("organisational", "intended use: " + (intended or "not stated in the study config")),
        "Us2": _item("organisational", "no override or feedback records for this version"),
        "Us3": _item("organisational", ""),
        "Us4": _item("organisational", ""),
        "Us5": _item("organisational", ""),
        "R1": _item("partly evidenced" if scanners else "not evidenced",
                    f"acquisition inventory per site (vendor, field strength); {coverage}"),
        "R2": _item("evidenced" if trained_scanners else "partly evidenced",
                    f"sites that contributed: {', '.join(v.site_ids) or 'none'}; {coverage}"),
        "R3": (_item("partly evidenced", f"per-vendor metrics over {len(by_vendor)} vendor(s); simulated-shift "
                     "stress tests are not registered") if len(by_vendor) > 1
               else _item("not evidenced", "no per-scanner or stress-test metrics")),
        "E1": _item("organisational", ""),
        "E2": (_item("partly evidenced", f"explainability artefacts: {', '.join(xai)}; the user-side evaluation is "
                     "organisational") if xai else
               _item("not evidenced", "no explainability artefact is registered with this version")),
        "G1": _item("organisational", ""),
        "G2": _item("partly evidenced", "only aggregates over at least each site's min_cohort left the sites"
                    + (f"; DP epsilon per site {eps}" + (f", delta {v.delta:g}" if v.delta is not None else "")
                       if eps else "; no DP") + "; the DPIA is organisational"),
        "G3": _item("organisational", "risks and mitigations are not linked in the registry"),
        "G4": (_item("partly evidenced", f"study config {v.study_hash[:12]} recorded at {study_event.ts} (event "
                     f"#{study_event.seq}), before this version ({v.created_at}); test splits are not registered")
               if study_event and study_event.ts <= v.created_at else _item("not evidenced", "")),
        "G5": _item("organisational", "`fedbiopsy registry export` writes a technical-documentation bundle"),
        "G6": _item("organisational", ""),
        "G7": _item("organisational", ""),
    }
    return {
        "format": CARD_FORMAT,
        "version": v.label, "kind": v.kind, "round": v.round, "phase": v.phase, "created_at": v.created_at,
        "study": {"name": v.study_name, "config_hash": v.study_hash, "run_id": v.run_id,
                  "code_version": v.code_version, "git_commit": v.git_commit},
        "artifact": {"name": v.artifact_name, "sha256": v.artifact_sha256, "size": v.artifact_size},
        "intended_use": {"statement": intended or _INTENDED.get(v.kind, ""),
                         "source": "study config" if intended else "default for the kind; to be stated by the study "
                                                                   "owner (organisational)"},
        "data": {"n_sites": len(v.sites), "n_cases": sum(s.n_cases for s in v.sites), "sites": data_sites},
        "metrics": {"per_site": site_metrics, "pooled": v.metrics.get("pooled", {}), "external_sites": external},
        "fairness": fairness,
        "robustness": {"scanners_in_training": trained_scanners, "metrics_by_vendor": by_vendor,
                       "metrics_by_field_strength": by_field},
        "explainability": {"artefacts": xai},
        "privacy": {"differential_privacy": bool(eps), "epsilon": eps, "max_epsilon": max(eps.values(), default=None),
                    "delta": v.delta, "aggregates_only": True},
        "lineage": [{"version": x.label, "kind": x.kind, "round": x.round, "phase": x.phase, "run_id": x.run_id,
                     "parent": f"v{x.parent_id}" if x.parent_id else None, "artifact_sha256": x.artifact_sha256,
                     "sites": [{"site_id": s.site_id, "n_cases": s.n_cases, "manifest_hash": s.manifest_hash}
                               for s in x.sites]} for x in lineage],
        "limitations": limitations,
        "audit": {"event_seq": own.seq if own else None, "event_hash": own.hash if own else None,
                  "head": {"seq": report.head[0], "hash": report.head[1]}, "verified": report.ok,
                  "first_problem": str(report.first) if report.first else None},
        "future_ai": [{"code": it.code, "principle": it.principle, "title": it.title, "scope": it.scope,
                       **items[it.code]} for it in ITEMS],
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown."""
    st, art, data = card["study"], card["artifact"], card["data"]
    lines = [f"# Model card: {card['version']} ({card['kind']}"
             + (f", round {card['round']}" if card["round"] is not None else "") + ")", "",
             f"- Study: **{st['name']}**, config `{st['config_hash']}`, run {st['run_id']}",
             f"- Code: fedbiopsy {st['code_version']}" + (f", git `{st['git_commit']}`" if st["git_commit"] else ""),
             f"- Artifact: `{art['name']}`, sha256 `{art['sha256']}`, {art['size']} bytes",
             f"- Phase: {card['phase']}; registered {card['created_at']}", "",
             "## Intended use", "", card["intended_use"]["statement"], "",
             f"_Source: {card['intended_use']['source']}._", "",
             f"## Data per site ({data['n_sites']} sites, {data['n_cases']} cases)", "",
             "| site | cases used | cases in manifest | manifest sha256 | vendor | field (T) |",
             "|---|---|---|---|---|---|"]
    for s in data["sites"]:
        lines.append(f"| {s['site_id']} | {s['n_cases']} | {_fmt(s['manifest_cases'])} | "
                     f"`{(s['manifest_hash'] or '—')[:16]}` | {_fmt(s['vendor'])} | {_fmt(s['field_strength'])} |")
    lines += ["", "## Metrics per site", ""]
    per_site = dict(card["metrics"]["per_site"])
    if card["metrics"]["pooled"]:
        per_site["pooled"] = card["metrics"]["pooled"]
    names = sorted({m for d in per_site.values() for m in d})
    if names:
        lines += ["| site | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for site, d in per_site.items():
            ext = " (external)" if site in card["metrics"]["external_sites"] else ""
            lines.append(f"| {site}{ext} | " + " | ".join(_fmt(d.get(m)) for m in names) + " |")
    else:
        lines.append("No metrics registered.")
    lines += ["", "### Fairness gap (worst site vs best site)", ""]
    if card["fairness"]:
        for m, f in card["fairness"].items():
            lines.append(f"- {m}: gap {_fmt(f['gap'])} — best {f['best']['site']} ({_fmt(f['best']['value'])}), "
                         f"worst {f['worst']['site']} ({_fmt(f['worst']['value'])})")
    else:
        lines.append("Not computable: fewer than two sites with metrics.")
    rob = card["robustness"]
    lines += ["", "## Robustness", "", f"- Scanners in training: {', '.join(rob['scanners_in_training']) or 'unknown'}"]
    for group, title in (("metrics_by_vendor", "vendor"), ("metrics_by_field_strength", "field strength")):
        for g, d in rob[group].items():
            lines.append(f"- Mean metrics, {title} {g}: " + ", ".join(f"{m} {_fmt(x)}" for m, x in d.items()))
    lines += ["", "## Explainability", "",
              ", ".join(map(str, card["explainability"]["artefacts"])) or "No explainability artefact registered.",
              "", "## Privacy", ""]
    pv = card["privacy"]
    lines.append("- No patient-level row left any site: every reply is an aggregate over at least the site's "
                 "`min_cohort` cases (enforced at the site).")
    if pv["differential_privacy"]:
        lines.append(f"- Differential privacy: epsilon per site {pv['epsilon']}, max {_fmt(pv['max_epsilon'])}, "
                     f"delta {_fmt(pv['delta'])}")
    else:
        lines.append("- No differential privacy for this version.")
    lines += ["", "## Lineage", "", "| version | kind | round | phase | run | parent | sites (cases, manifest) |",
              "|---|---|---|---|---|---|---|"]
    for x in card["lineage"]:
        sites = ", ".join(f"{s['site_id']} ({s['n_cases']}, `{(s['manifest_hash'] or '—')[:12]}`)" for s in x["sites"])
        lines.append(f"| {x['version']} | {x['kind']} | {_fmt(x['round'])} | {x['phase']} | {x['run_id']} | "
                     f"{_fmt(x['parent'])} | {sites} |")
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in card["limitations"]]
    au = card["audit"]
    lines += ["", "## Audit trail", "", f"- Registered by audit event #{_fmt(au['event_seq'])} "
              f"(`{(au['event_hash'] or '—')[:16]}`); log head #{au['head']['seq']} `{au['head']['hash']}`",
              f"- Verification: {'passes' if au['verified'] else 'FAILS — ' + str(au['first_problem'])}", "",
              "## FUTURE-AI recommendations", "", "| code | recommendation | status | evidence |", "|---|---|---|---|"]
    for it in card["future_ai"]:
        lines.append(f"| {it['code']} | {it['title']} | {it['status']} | {it['evidence'] or '—'} |")
    return "\n".join(lines) + "\n"
