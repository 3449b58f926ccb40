"""Orchestration of a study's phases on the server, over any Flower Grid (simulation or deployment)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.serverapp import Grid

from common.config import StudyConfig
from common.errors import ConfigError
from server.federation import wait_for_nodes
from server.phases import PHASES, PhaseContext

log = logging.getLogger("fedbiopsy.server")


def run_study(grid: Grid, study: StudyConfig, result_dir: Path) -> dict:
    """Run the study's phases in order; each phase's result is written to ``result_dir/<phase>.json``."""
    unknown = [p for p in study.phases if p not in PHASES]
    if unknown:
        raise ConfigError("study config", f"unknown phase(s) {unknown}", f"use phases among {list(PHASES)}")
    result_dir.mkdir(parents=True, exist_ok=True)
    node_ids = wait_for_nodes(grid, study.min_sites)
    log.info("study %s (%s): %d site(s) connected", study.name, study.hash[:12], len(node_ids))
    ctx = PhaseContext(grid=grid, study=study, node_ids=node_ids, result_dir=result_dir)
    for phase in study.phases:
        log.info("phase %s: start", phase)
        ctx.outputs[phase] = PHASES[phase](ctx)
        (result_dir / f"{phase}.json").write_text(json.dumps(ctx.outputs[phase], indent=2, default=str))
        log.info("phase %s: done", phase)
    summary = {"study": study.name, "study_hash": study.hash, "phases": list(study.phases),
               "participants": ctx.participants, "outputs": ctx.outputs}
    (result_dir / "study.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
