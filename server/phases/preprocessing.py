"""Server step of the preprocessing phase: build the global plan and return it to the sites.

Target spacing: the study's ``preprocessing.resample.target_spacing`` when set, else the fingerprint phase's
``target_spacing`` (the sites' median spacings, merged). Nyúl landmarks: every site's mean landmarks
(``query.nyul_landmarks``), averaged into the standard scale (:func:`common.nyul.aggregate_nyul`). The plan
is written as ``plan.json`` (a "plan"-kind artifact) and sent to the sites (``query.preprocessing_plan``),
each of which answers with the hash of what it stored.
"""

from __future__ import annotations

import logging

import numpy as np

from common.errors import ConfigError, ProtocolError
from common.hashing import canonical_json
from common.nyul import aggregate_nyul
from common.plan import build_plan, write_plan
from server.federation import query_sites
from server.phases.base import PhaseContext
from server.phases.preprocessing_effect import apply_at_sites

log = logging.getLogger("fedbiopsy.server")
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
    x, y, z = (float(s) for s in (configured or fingerprint["target_spacing"]))
    spacing = (x, y, z)
    result = query_sites(ctx.grid, "nyul_landmarks", study,
                         {"target_spacing": np.asarray(spacing, dtype=np.float64)}, node_ids=ctx.node_ids)
    nyul = aggregate_nyul(result.replies, study.sequences)
    counts = dict(nyul["cases_per_site"])
    plan = build_plan(study, spacing, nyul, counts)
    path = ctx.result_dir / PLAN_FILE
    sha = write_plan(plan, path)
    plan_json = canonical_json(plan.model_dump(mode="json"))
    acks = query_sites(ctx.grid, "preprocessing_plan", study, {"plan_json": plan_json},
                       node_ids=sorted(result.node_of_site.values()))
    for site, reply in acks.replies.items():
        if reply.get("plan_sha256") != sha:
            raise ProtocolError(site, "stored a plan whose hash differs from the server's",
                                "run the same fedbiopsy version at every site")
    ctx.participants["preprocessing"] = counts
    log.info("preprocessing plan %s: spacing %s, Nyúl over %d case(s) at %d site(s)", sha[:12],
             [round(s, 3) for s in spacing], nyul["n_cases"], len(counts))
    effect = None
    if study.preprocessing.apply_at_sites and "fingerprint" in ctx.outputs:
        effect = apply_at_sites(ctx, sorted(acks.node_of_site.values()))
    return {
        "effect": effect,
        "plan": plan.model_dump(mode="json"),
        "plan_sha256": sha,
        "delivered_to": sorted(acks.replies),
        "refused": {str(n): reason for n, reason in {**result.errors, **acks.errors}.items()},
        "artifacts": [{
            "kind": "plan", "path": str(path), "round": None,
            "metrics": {site: {"n_cases": float(n)} for site, n in counts.items()},
            "settings_hash": plan.settings_hash,
        }],
    }
