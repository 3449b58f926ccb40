"""Server step of the fingerprint phase: query every site and merge the replies into the global plan."""

from __future__ import annotations

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
    ctx.participants["fingerprint"] = {s: int(r["n_cases"]) for s, r in result.replies.items()}  # type: ignore[call-overload]
    return merged
