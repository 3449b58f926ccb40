"""Orchestration of a study's phases on the server, over any Flower Grid (simulation or deployment)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.serverapp import Grid

from common.config import StudyConfig
from common.fingerprint import aggregate_fingerprints
from server.federation import query_sites, wait_for_nodes

log = logging.getLogger("fedbiopsy.server")


def run_fingerprint(grid: Grid, study: StudyConfig, node_ids: list[int]) -> dict:
    """Phase 1: every site's fingerprint, merged into the global fingerprint and plan."""
    result = query_sites(grid, "fingerprint", study, node_ids=node_ids)
    merged = aggregate_fingerprints(result.replies, study.sequences)
    merged["scanners"] = {
        s: {"vendor": r.get("vendor"), "field_strength": r.get("field_strength")} for s, r in result.replies.items()
    }
    merged["refused"] = {str(n): reason for n, reason in result.errors.items()}
    return merged


def run_study(grid: Grid, study: StudyConfig, result_dir: Path) -> dict:
    """Run the study's phases in order and write each phase's result under ``result_dir``."""
    result_dir.mkdir(parents=True, exist_ok=True)
    node_ids = wait_for_nodes(grid, study.min_sites)
    log.info("study %s (%s): %d site(s) connected", study.name, study.hash[:12], len(node_ids))
    outputs: dict = {"study": study.name, "study_hash": study.hash}
    if "fingerprint" in study.phases:
        outputs["fingerprint"] = run_fingerprint(grid, study, node_ids)
        (result_dir / "fingerprint.json").write_text(json.dumps(outputs["fingerprint"], indent=2))
        log.info("fingerprint: %d cases over %d sites", outputs["fingerprint"]["n_cases"],
                 outputs["fingerprint"]["n_sites"])
    (result_dir / "study.json").write_text(json.dumps(outputs, indent=2))
    return outputs
