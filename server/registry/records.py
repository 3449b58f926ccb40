"""Read-only views of registry rows, and the snapshots that audit events carry.

Every row the registry writes (study, run, phase with its participants, model version with its sites) is
snapshotted into the payload of the audit event that records it; ``verify`` compares each row with the
latest snapshot of it, so editing a table behind the registry's back is detected as well.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from common.hashing import sha256_text
from server.registry.models import ModelVersion, Phase, Run, Study

KINDS: tuple[str, ...] = ("plan", "segmentation", "classifier", "harmonisation", "signature", "outcomes",
                          "prognosis")
RECORD_EVENTS = frozenset({"study.recorded", "run.started", "run.finished", "run.failed", "phase.recorded",
                           "version.registered"})  # the events whose payload["record"] snapshots a row


@dataclass(frozen=True)
class SiteData:
    """A site's contribution: cases used, and its data fingerprint (manifest hash and case count)."""

    site_id: str
    n_cases: int
    manifest_hash: str | None = None
    manifest_cases: int | None = None


@dataclass(frozen=True)
class Version:
    """A registered model version with its provenance (detached from the database)."""

    id: int
    kind: str
    round: int | None
    phase: str
    run_id: int
    study_name: str
    study_hash: str
    code_version: str
    git_commit: str | None
    parent_id: int | None
    plan_id: int | None
    harmonisation_id: int | None
    artifact_sha256: str
    artifact_name: str
    artifact_size: int
    settings_hash: str | None
    preprocessing_hash: str | None
    metrics: dict[str, dict[str, float | None]]
    epsilon: dict[str, float]
    delta: float | None
    extra: dict[str, Any]
    created_at: str
    sites: tuple[SiteData, ...] = field(default=())

    @property
    def label(self) -> str:
        """The version's name, ``v<id>``."""
        return f"v{self.id}"

    @property
    def site_ids(self) -> tuple[str, ...]:
        """The sites whose data contributed directly, sorted."""
        return tuple(s.site_id for s in self.sites)


@dataclass(frozen=True)
class Touch:
    """A version a site's data contributed to: directly, or through the ancestors named in ``via``."""

    version: Version
    direct: bool
    via: tuple[int, ...] = ()


def study_snapshot(s: Study) -> dict[str, Any]:
    return {"id": s.id, "name": s.name, "config_hash": s.config_hash, "config_sha256": sha256_text(s.config_json),
            "created_at": s.created_at}


def run_snapshot(r: Run) -> dict[str, Any]:
    return {"id": r.id, "study_id": r.study_id, "started_at": r.started_at, "finished_at": r.finished_at,
            "status": r.status, "code_version": r.code_version, "git_commit": r.git_commit, "git_dirty": r.git_dirty,
            "result_dir": r.result_dir, "error": r.error}


def phase_snapshot(p: Phase) -> dict[str, Any]:
    return {"id": p.id, "run_id": p.run_id, "name": p.name, "ordinal": p.ordinal, "output_hash": p.output_hash,
            "recorded_at": p.recorded_at,
            "participants": [{"site_id": x.site_id, "n_cases": x.n_cases, "manifest_hash": x.manifest_hash,
                              "manifest_cases": x.manifest_cases} for x in p.participations]}


def version_snapshot(v: ModelVersion, artifact_size: int) -> dict[str, Any]:
    return {"id": v.id, "run_id": v.run_id, "phase_id": v.phase_id, "kind": v.kind, "round": v.round,
            "parent_id": v.parent_id, "plan_id": v.plan_id, "harmonisation_id": v.harmonisation_id,
            "artifact_sha256": v.artifact_sha256, "artifact_size": artifact_size, "settings_hash": v.settings_hash,
            "preprocessing_hash": v.preprocessing_hash, "metrics": json.loads(v.metrics_json),
            "epsilon": json.loads(v.epsilon_json), "delta": v.delta, "extra": json.loads(v.extra_json),
            "created_at": v.created_at,
            "sites": [{"site_id": x.site_id, "n_cases": x.n_cases, "manifest_hash": x.manifest_hash,
                       "manifest_cases": x.manifest_cases} for x in v.sites]}


def strip_none(obj: Any) -> Any:
    """``obj`` without None-valued keys, recursively (fields added by later schemas read back as None)."""
    if isinstance(obj, dict):
        return {k: strip_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [strip_none(v) for v in obj]
    return obj
