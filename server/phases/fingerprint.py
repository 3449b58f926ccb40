"""Server step of the fingerprint phase: query every site and merge the replies into the global plan."""

from __future__ import annotations

import json

from common.fingerprint import aggregate_fingerprints
from server.federation import query_sites
from server.phases.base import PhaseContext


def run(ctx: PhaseContext) -> dict:
    """Every site's fingerprint, merged into the global fingerprint (and the target spacing)."""
    result = query_sites(ctx.grid, "fingerprint", ctx.study, node_ids=ctx.node_ids)
    merged = aggregate_fingerprints(result.replies, ctx.study.sequences)
    merged["scanners"] = {
        s: {"vendor": r.get("vendor"), "field_strength": r.get("field_strength")} for s, r in result.replies.items()
    }
    merged["refused"] = {str(n): reason for n, reason in result.errors.items()}
    merged["dropped"] = [str(n) for n in result.dropped]
    ctx.participants["fingerprint"] = {s: int(r["n_cases"]) for s, r in result.replies.items()}  # type: ignore[call-overload]
    merged["data_fingerprints"] = {  # the sites' data versions, for the registry: never a patient identifier
        s: {"manifest_hash": r.get("manifest_hash"), "n_cases": int(r.get("manifest_cases", r["n_cases"]))}  # type: ignore[call-overload]
        for s, r in result.replies.items()
    }
    plan = ctx.result_dir / "plan.json"  # the lineage root: every later version of the run derives from it
    plan.write_text(json.dumps(merged, indent=2, sort_keys=True, default=str))
    merged["artifacts"] = [{"kind": "plan", "path": str(plan), "round": None, "metrics": {}}]
    return merged
