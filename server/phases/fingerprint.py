"""Server step of the fingerprint phase: the merged fingerprint (:func:`common.fingerprint.run_fingerprint`),
written as ``plan.json``, the lineage root of every later version of the run."""

from __future__ import annotations

import json

from common.fingerprint import run_fingerprint
from server.phases.base import PhaseContext


def run(ctx: PhaseContext) -> dict:
    """Every site's fingerprint, merged into the global fingerprint (and the target spacing)."""
    query = ctx.query()
    merged = run_fingerprint(query, ctx.study.channels)
    merged["refused"] = {str(n): reason for n, reason in query.last.errors.items()}
    merged["dropped"] = [str(n) for n in query.last.dropped]
    ctx.participants["fingerprint"] = dict(merged["cases_per_site"])
    plan = ctx.result_dir / "plan.json"
    plan.write_text(json.dumps(merged, indent=2, sort_keys=True, default=str))
    merged["artifacts"] = [{"kind": "plan", "path": str(plan), "round": None, "metrics": {}}]
    return merged
