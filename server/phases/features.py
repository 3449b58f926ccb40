"""Server step of the features phase: every site computes its radiomics table (kept at the site) on the plan's
grid with the study's settings (:func:`common.features.protocol.run_features`), all with the same settings."""

from __future__ import annotations

import json

from common.features.protocol import run_features
from common.features.settings import load_radiomics_settings
from server.phases.base import PhaseContext, imaging_grid


def run(ctx: PhaseContext) -> dict:
    """Sites extract and keep their features; the result holds counts, the settings and their hash."""
    settings = load_radiomics_settings(ctx.study.features.settings)
    grid = imaging_grid(ctx)  # preprocessed inputs are on the plan's grid already: radiomics resamples to it
    spacing = grid["grid_spacing"] or ctx.outputs.get("fingerprint", {}).get("target_spacing")
    query = ctx.query()
    summary = run_features(query, settings, spacing)
    resolved = settings.resolve(ctx.study.channels, spacing)
    (ctx.result_dir / "radiomics_settings.json").write_text(json.dumps(resolved, indent=2))
    summary["settings"] = resolved
    summary["target_spacing"] = list(spacing) if spacing is not None else None
    summary.update(grid)
    summary["refused"] = {str(n): reason for n, reason in query.errors.items()}
    ctx.participants["features"] = dict(summary["cases_per_site"])
    return summary
