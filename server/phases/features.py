"""Server step of the features phase: ask every site to compute its radiomics table (kept at the site) on the
plan's grid, with the study's settings, and check that all sites used the same settings."""

from __future__ import annotations

import json

import numpy as np

from client.features.config import load_radiomics_settings
from client.steps.features import SETTINGS_KEY, SPACING_KEY
from common.feature_summary import summarise_feature_replies
from server.federation import query_sites
from server.phases.base import PhaseContext


def run(ctx: PhaseContext) -> dict:
    """Sites extract and keep their features; the result holds counts, the settings and their hash."""
    settings = load_radiomics_settings(ctx.study.features.settings)
    payload: dict[str, object] = {SETTINGS_KEY: json.dumps(settings.model_dump(mode="json"))}
    spacing = ctx.outputs.get("fingerprint", {}).get("target_spacing")
    if spacing is not None:
        payload[SPACING_KEY] = np.asarray(spacing, dtype=np.float64)
    result = query_sites(ctx.grid, "features", ctx.study, payload, node_ids=ctx.node_ids)
    summary = summarise_feature_replies(result.replies)
    resolved = settings.resolve(ctx.study.sequences, spacing)
    (ctx.result_dir / "radiomics_settings.json").write_text(json.dumps(resolved, indent=2))
    summary["settings"] = resolved
    summary["target_spacing"] = list(spacing) if spacing is not None else None
    summary["refused"] = {str(n): reason for n, reason in result.errors.items()}
    ctx.participants["features"] = dict(summary["cases_per_site"])
    return summary
