"""Verification: the audit chain, every record against its audit snapshot, every artifact against its hash."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.hashing import sha256_text
from server.registry import audit
from server.registry.audit import Broken
from server.registry.errors import RegistryError
from server.registry.models import Artifact, AuditEvent, ModelVersion, Phase, Run, Study
from server.registry.records import (
    RECORD_EVENTS,
    phase_snapshot,
    run_snapshot,
    strip_none,
    study_snapshot,
    version_snapshot,
)
from server.registry.store import ArtifactStore


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :meth:`Registry.verify`: every failure found, first one first."""

    broken: tuple[Broken, ...]
    n_events: int
    n_versions: int
    n_artifacts: int
    head: tuple[int, str]

    @property
    def ok(self) -> bool:
        return not self.broken

    @property
    def first(self) -> Broken | None:
        """The first broken link (None when everything verifies)."""
        return self.broken[0] if self.broken else None


def format_head(head: tuple[int, str]) -> str:
    """A head as it is published (study results, report, ``registry verify --head``): ``<seq>:<sha256>``."""
    return f"{int(head[0])}:{head[1]}"


def parse_head(text: str) -> tuple[int | None, str]:
    """``<seq>:<sha256>`` (as :func:`format_head` writes it) or a bare sha256, as (seq or None, hash)."""
    raw = text.strip().lower()
    seq_text, _, digest = raw.rpartition(":")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or (seq_text and not seq_text.isdigit()):
        raise RegistryError(f"--head {text[:80]!r} is not <seq>:<sha256> or a sha256. Fix: copy the head from the "
                            "study results (study.json registry.head) or the report")
    return (int(seq_text) if seq_text else None), digest


def verify_registry(s: Session, store: ArtifactStore, expected_head: str | None = None,
                    artifacts: bool | Iterable[str] = True) -> VerifyReport:
    """Everything :meth:`Registry.verify` checks, within the read transaction of ``s``."""
    only = None if isinstance(artifacts, bool) else set(artifacts)
    broken, n_events = audit.verify_chain(s)
    rows = list(s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars())
    if expected_head:
        seq, digest = parse_head(expected_head)
        if not any(r.hash == digest and (seq is None or r.seq == seq) for r in rows):
            shown = f"#{seq} {digest[:16]}..." if seq is not None else f"{digest[:16]}..."
            broken.append(Broken("audit head", f"the published head {shown} is not in the log: the log was "
                                 "truncated or rewritten after it was published"))
    broken.extend(check_records(s, rows))
    arts = list(s.execute(select(Artifact).order_by(Artifact.sha256)).scalars())
    users: dict[str, list[int]] = {}
    for vid, sha in s.execute(select(ModelVersion.id, ModelVersion.artifact_sha256).order_by(ModelVersion.id)):
        users.setdefault(sha, []).append(vid)
    for a in arts:
        if artifacts is False or (only is not None and a.sha256 not in only):
            continue
        problem = store.check(a.sha256, a.size)
        if problem:
            names = ", ".join(f"v{i}" for i in users.get(a.sha256, [])) or "no version"
            broken.append(Broken(f"artifact {a.sha256[:12]} ({a.name}, {names})", problem))
    n_versions = len({i for ids in users.values() for i in ids})
    head = (rows[-1].seq, rows[-1].hash) if rows else (0, audit.GENESIS)
    return VerifyReport(tuple(broken), n_events, n_versions, len(arts), head)


def _audit_snapshots(events: list[AuditEvent]) -> dict[str, tuple[int, Any]]:
    """The latest audit snapshot of each registry row, with the sequence number of its event."""
    snaps: dict[str, tuple[int, Any]] = {}
    for e in events:
        if e.kind in RECORD_EVENTS:
            try:
                snaps[e.subject] = (e.seq, json.loads(e.payload).get("record"))
            except (ValueError, AttributeError):
                snaps[e.subject] = (e.seq, None)
    return snaps


def _current_rows(s: Session) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every registry row as it is now: subject -> (label, snapshot)."""
    sizes = {sha: size for sha, size in s.execute(select(Artifact.sha256, Artifact.size))}
    current: dict[str, tuple[str, dict[str, Any]]] = {}
    for st in s.execute(select(Study)).scalars():
        current[f"study:{st.id}"] = (f"study {st.id} ({st.name})", study_snapshot(st))
    for r in s.execute(select(Run)).scalars():
        current[f"run:{r.id}"] = (f"run {r.id}", run_snapshot(r))
    for p in s.execute(select(Phase)).scalars():
        current[f"phase:{p.id}"] = (f"phase {p.id} ({p.name} of run {p.run_id})", phase_snapshot(p))
    for v in s.execute(select(ModelVersion)).scalars():
        current[f"version:{v.id}"] = (f"model version v{v.id}", version_snapshot(v, sizes.get(v.artifact_sha256, -1)))
    return current


def check_records(s: Session, events: list[AuditEvent]) -> list[Broken]:
    """Each registry row against the latest audit snapshot of it, in log order."""
    snaps = _audit_snapshots(events)
    current = _current_rows(s)
    broken = [Broken(f"study {st.id} ({st.name})", "its stored configuration does not match its hash")
              for st in s.execute(select(Study)).scalars() if sha256_text(st.config_json) != st.config_hash]
    for subject, (label, snap) in sorted(current.items(), key=lambda kv: snaps.get(kv[0], (10**12, None))[0]):
        if subject not in snaps:
            broken.append(Broken(label, "has no audit event: its event was deleted, or the row was added outside "
                                 "the registry"))
            continue
        seq, recorded = snaps[subject]
        if strip_none(recorded) != strip_none(snap):
            fields = sorted(k for k in set(snap) | set(recorded or {})
                            if strip_none((recorded or {}).get(k)) != strip_none(snap.get(k)))
            broken.append(Broken(label, f"differs from its audit event #{seq} in {', '.join(fields) or 'content'} "
                                 "(the table or the event was edited)"))
    for subject, (seq, _) in sorted(snaps.items(), key=lambda kv: kv[1][0]):
        if subject not in current:
            broken.append(Broken(subject.replace(":", " "), f"recorded by audit event #{seq} but missing from the "
                                 "tables (deleted)"))
    return broken
