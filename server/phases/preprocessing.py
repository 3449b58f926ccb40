"""Server step of the preprocessing phase: the global plan built, delivered and its effect measured.

Target spacing: the study's ``preprocessing.resample.target_spacing`` when set, else the fingerprint phase's
``target_spacing`` (the sites' median spacings, merged). The rounds are
:func:`common.preprocessing.run_preprocessing`'s. The plan is written as ``plan.json`` (a "plan"-kind
artifact); with ``preprocessing.apply_at_sites`` the before/after histograms are drawn under
``preprocessing/histograms.png``.
"""

from __future__ import annotations

from common.errors import ConfigError
from common.plan import write_plan
from common.preprocessing import run_preprocessing
from server.figures.preprocessing import plot_histograms
from server.phases.base import PhaseContext

PLAN_FILE = "plan.json"


def run(ctx: PhaseContext) -> dict:
    """Nyúl landmarks from every site, the plan written and delivered; returns the plan and its artifact."""
    study = ctx.study
    configured = study.preprocessing.resample.target_spacing
    fingerprint = ctx.outputs.get("fingerprint") or {}
    if configured is None and "target_spacing" not in fingerprint:
        raise ConfigError("study config", "the preprocessing phase needs the target spacing",
                          "list `fingerprint` before `preprocessing` in phases, or set "
                          "preprocessing.resample.target_spacing")
    apply = study.preprocessing.apply_at_sites and "fingerprint" in ctx.outputs
    query = ctx.query(fixed=False)
    result = run_preprocessing(query, study, configured or fingerprint["target_spacing"],
                               fingerprint if apply else None)
    path = ctx.result_dir / PLAN_FILE
    write_plan(result.plan, path)  # the same canonical JSON the sites stored, so the same sha256
    ctx.participants["preprocessing"] = result.counts
    effect = None
    if result.effect is not None:
        figure = plot_histograms(result.effect.replies, result.effect.edges,
                                 ctx.result_dir / "preprocessing" / "histograms.png")
        effect = {**result.effect.summary(), "figures": {"histograms": str(figure)},
                  "refused": {str(n): reason for n, reason in query.last.errors.items()}}
    return {
        "effect": effect,
        "plan": result.plan.model_dump(mode="json"),
        "plan_sha256": result.plan_sha256,
        "delivered_to": result.delivered_to,
        "refused": {str(n): reason for n, reason in query.errors.items()},
        "artifacts": [{
            "kind": "plan", "path": str(path), "round": None,
            "metrics": {site: {"n_cases": float(n)} for site, n in result.counts.items()},
            "settings_hash": result.plan.settings_hash,
        }],
    }
