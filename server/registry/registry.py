"""The :class:`Registry`: record studies, runs, phases and model versions; query lineage; verify integrity."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session

from common.config import StudyConfig
from common.hashing import canonical_json, sha256_text
from server.registry import audit
from server.registry.audit import Event
from server.registry.database import ARTIFACT_DIR, Location, make_engine, resolve_location
from server.registry.errors import ArtifactError, RegistryError, UnknownVersionError
from server.registry.migrations import current_version, migrate
from server.registry.models import (
    Artifact,
    AuditEvent,
    AuditHead,
    ModelVersion,
    Participation,
    Phase,
    Run,
    Study,
    VersionSite,
)
from server.registry.provenance import code_version
from server.registry.records import (
    RECORD_EVENTS,
    SiteData,
    Touch,
    Version,
    phase_snapshot,
    run_snapshot,
    study_snapshot,
    version_snapshot,
)
from server.registry.spec import ArtifactSpec, parse_artifacts
from server.registry.store import ArtifactStore
from server.registry.verify import VerifyReport, verify_registry

log = logging.getLogger("fedbiopsy.registry")
_REF = re.compile(r"^v?(\d+)$", re.IGNORECASE)
_SHA = re.compile(r"^(?:sha256:)?([0-9a-f]{8,64})$", re.IGNORECASE)


class Registry:
    """A model registry: a database (any SQLAlchemy URL) and a content-addressed artifact store.

    Open one with :func:`open_registry`; close it (or use it as a context manager) when done.
    """

    def __init__(self, location: Location, engine: Engine) -> None:
        self.location = location
        self.store = ArtifactStore(location.folder / ARTIFACT_DIR)
        self._engine = engine
        self._writer = engine.execution_options(immediate=True)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()

    def __repr__(self) -> str:
        return f"Registry({self.location.describe()!r})"

    # --- transactions ------------------------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[Session]:
        try:
            with Session(self._writer, expire_on_commit=False) as s, s.begin():
                # serialise writers before anything is read (SQLite: BEGIN IMMEDIATE did; others: the row lock)
                s.execute(select(AuditHead.id).where(AuditHead.id == 1).with_for_update())
                yield s
        except OperationalError as exc:
            raise RegistryError(f"registry {self.location.describe()}: the database refused the write ({exc.orig}). "
                                "Fix: check that it is writable and not locked by a stuck process") from exc

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as s, s.begin():
            yield s

    # --- writing -----------------------------------------------------------------------------------------------
    def append_event(self, kind: str, subject: str, payload: Mapping[str, Any]) -> Event:
        """Append a free-form audit event (e.g. ``version.promoted``, ``inference.called``); returns it."""
        if kind in RECORD_EVENTS:
            raise RegistryError(f"event kind {kind!r} is reserved for the registry's own records. Fix: use another")
        with self._write() as s:
            return audit.to_event(audit.append(s, kind, subject, dict(payload)))

    def start_run(self, study: StudyConfig, result_dir: Path | str | None = None) -> int:
        """Record the study (once per config hash) and a new run of it by this code version; returns the run id."""
        config_json = canonical_json(study.hashed_content())
        cv = code_version()
        with self._write() as s:
            st = s.execute(select(Study).where(Study.config_hash == study.hash)).scalar_one_or_none()
            if st is None:
                st = Study(name=study.name, config_hash=study.hash, config_json=config_json, created_at=audit.now())
                s.add(st)
                s.flush()
                audit.append(s, "study.recorded", f"study:{st.id}",
                             {"record": study_snapshot(st), "config": json.loads(config_json)})
            run = Run(study_id=st.id, started_at=audit.now(), status="running", code_version=cv.package,
                      git_commit=cv.git_commit, git_dirty=cv.git_dirty,
                      result_dir=str(result_dir) if result_dir is not None else None)
            s.add(run)
            s.flush()
            audit.append(s, "run.started", f"run:{run.id}", {"record": run_snapshot(run)})
            log.info("registry: run %d of study %s (%s) by fedbiopsy %s%s", run.id, study.name, study.hash[:12],
                     cv.package, f" @ {cv.git_commit[:12]}" if cv.git_commit else "")
            return run.id

    def finish_run(self, run_id: int, error: str | None = None) -> None:
        """Close a run as ``finished`` (or ``failed`` with the error's text)."""
        with self._write() as s:
            run = self._run(s, run_id)
            run.finished_at = audit.now()
            run.status = "failed" if error else "finished"
            run.error = error
            s.flush()
            audit.append(s, f"run.{run.status}", f"run:{run.id}", {"record": run_snapshot(run)})

    def record_phase(self, run_id: int, phase: str, output: Mapping[str, Any], participants: Mapping[str, int],
                     result_dir: Path | str) -> list[Version]:
        """Record a finished phase, its participating sites and every artifact its output lists.

        ``participants``: {site_id: n_cases}. Site data fingerprints come from the output's
        ``"data_fingerprints"`` ({site_id: {"manifest_hash", "n_cases"}}) or from an earlier phase of the run.
        Relative artifact paths are relative to ``result_dir``. Returns the new model versions.
        """
        specs = parse_artifacts(phase, output)
        files = [spec.file(Path(result_dir)) for spec in specs]
        for spec, path in zip(specs, files, strict=True):
            if not path.is_file():
                raise RegistryError(f"phase {phase!r}: artifact {spec.kind} file {path} does not exist. Fix: write it "
                                    "under the result folder before returning it in 'artifacts'")
        stored = [self.store.put(p) for p in files]
        reported = _fingerprints(phase, output)
        output_hash = sha256_text(json.dumps(output, sort_keys=True, separators=(",", ":"), default=str))
        if specs and not participants:
            log.warning("registry: phase %s lists artifacts but no participating sites (set ctx.participants)", phase)
        with self._write() as s:
            run = self._run(s, run_id)
            if run.status != "running":
                raise RegistryError(f"run {run_id} is {run.status}; no phase can be added. Fix: start a new run")
            known = self._run_fingerprints(s, run_id)
            known.update(reported)
            ordinal = s.execute(select(func.count()).select_from(Phase).where(Phase.run_id == run_id)).scalar_one() + 1
            row = Phase(run_id=run_id, name=phase, ordinal=ordinal, output_hash=output_hash, recorded_at=audit.now())
            s.add(row)
            s.flush()
            for site, n in sorted(participants.items()):
                mh, mc = known.get(site, (None, None))
                s.add(Participation(phase_id=row.id, site_id=site, n_cases=int(n), manifest_hash=mh, manifest_cases=mc))
            s.flush()
            s.refresh(row, ["participations"])
            audit.append(s, "phase.recorded", f"phase:{row.id}", {"record": phase_snapshot(row)})
            ids = [self._add_version(s, run_id, row, spec, st.sha256, st.size, path.name, participants, known)
                   for spec, st, path in zip(specs, stored, files, strict=True)]
        return [self.version(i) for i in ids]

    def _add_version(self, s: Session, run_id: int, phase: Phase, spec: ArtifactSpec, sha: str, size: int,
                     name: str, participants: Mapping[str, int], known: Mapping[str, tuple[str | None, int | None]]
                     ) -> int:
        if s.get(Artifact, sha) is None:
            s.add(Artifact(sha256=sha, size=size, name=name[:255], created_at=audit.now()))
        plan = self._latest(s, run_id, "plan")
        harmonisation = self._latest(s, run_id, "harmonisation")
        parent = None
        if spec.parent_kind:
            parent = self._latest(s, run_id, spec.parent_kind)
            if parent is None:
                log.warning("registry: phase %s declares parent_kind %r, but the run has no such version yet; "
                            "using the default parent", phase.name, spec.parent_kind)
        if parent is None:
            parent = self._latest(s, run_id, spec.kind, phase_id=phase.id)
        if parent is None:
            parent = plan  # a later plan (preprocessing, network) derives from the run's earlier plan
        v = ModelVersion(run_id=run_id, phase_id=phase.id, kind=spec.kind, round=spec.round,
                         parent_id=parent.id if parent else None, plan_id=plan.id if plan else None,
                         harmonisation_id=harmonisation.id if harmonisation and spec.kind != "harmonisation" else None,
                         artifact_sha256=sha, settings_hash=spec.settings_hash,
                         preprocessing_hash=spec.preprocessing_hash, metrics_json=canonical_json(spec.clean_metrics()),
                         epsilon_json=canonical_json(spec.epsilon), delta=spec.delta,
                         extra_json=canonical_json(spec.extra), created_at=audit.now())
        s.add(v)
        s.flush()
        sites = spec.participants if spec.participants is not None else participants
        for site, n in sorted(sites.items()):
            mh, mc = known.get(site, (None, None))
            s.add(VersionSite(version_id=v.id, site_id=site, n_cases=int(n), manifest_hash=mh, manifest_cases=mc))
        s.flush()
        s.refresh(v, ["sites"])
        audit.append(s, "version.registered", f"version:{v.id}", {"record": version_snapshot(v, size)})
        log.info("registry: v%d %s%s from phase %s, sites %s", v.id, spec.kind,
                 f" round {spec.round}" if spec.round is not None else "", phase.name, sorted(sites))
        return v.id

    @staticmethod
    def _latest(s: Session, run_id: int, kind: str, phase_id: int | None = None) -> ModelVersion | None:
        q = select(ModelVersion).where(ModelVersion.run_id == run_id, ModelVersion.kind == kind)
        if phase_id is not None:
            q = q.where(ModelVersion.phase_id == phase_id)
        return s.execute(q.order_by(ModelVersion.id.desc()).limit(1)).scalar_one_or_none()

    @staticmethod
    def _run(s: Session, run_id: int) -> Run:
        run = s.get(Run, run_id)
        if run is None:
            raise RegistryError(f"no run {run_id} in the registry. Fix: use the id start_run returned")
        return run

    @staticmethod
    def _run_fingerprints(s: Session, run_id: int) -> dict[str, tuple[str | None, int | None]]:
        rows = s.execute(select(Participation).join(Phase, Participation.phase_id == Phase.id)
                         .where(Phase.run_id == run_id, Participation.manifest_hash.is_not(None))
                         .order_by(Phase.ordinal)).scalars()
        return {p.site_id: (p.manifest_hash, p.manifest_cases) for p in rows}

    # --- reading -----------------------------------------------------------------------------------------------
    def versions(self, kind: str | None = None, site: str | None = None, run_id: int | None = None) -> list[Version]:
        """Model versions, oldest first, optionally of one kind, one run, or with one site contributing directly."""
        with self._read() as s:
            q = select(ModelVersion).order_by(ModelVersion.id)
            if kind:
                q = q.where(ModelVersion.kind == kind)
            if run_id is not None:
                q = q.where(ModelVersion.run_id == run_id)
            if site:
                q = q.where(ModelVersion.id.in_(select(VersionSite.version_id).where(VersionSite.site_id == site)))
            return [self._view(s, v) for v in s.execute(q).scalars()]

    def version(self, ref: str | int) -> Version:
        """One version by ``v<id>``, ``<id>``, or an artifact sha256 prefix (8+ hex digits, ``sha256:`` optional)."""
        with self._read() as s:
            return self._view(s, self._resolve(s, ref))

    def lineage(self, ref: str | int) -> list[Version]:
        """The version and every version it derives from (parent, plan, harmonisation, transitively), newest first."""
        with self._read() as s:
            start = self._resolve(s, ref)
            seen: dict[int, ModelVersion] = {}
            todo = [start]
            while todo:
                v = todo.pop()
                if v.id in seen:
                    continue
                seen[v.id] = v
                todo.extend(x for i in (v.parent_id, v.plan_id, v.harmonisation_id)
                            if i is not None and (x := s.get(ModelVersion, i)) is not None)
            return [self._view(s, seen[i]) for i in sorted(seen, reverse=True)]

    def touched_by(self, site_id: str) -> list[Touch]:
        """Every version ``site_id``'s data contributed to, directly or through an ancestor (for withdrawals)."""
        with self._read() as s:
            rows = {v.id: v for v in s.execute(select(ModelVersion).order_by(ModelVersion.id)).scalars()}
            direct = set(s.execute(select(VersionSite.version_id).where(VersionSite.site_id == site_id)).scalars())
            ancestors: dict[int, set[int]] = {}
            for vid in sorted(rows):  # ancestors always have smaller ids
                v = rows[vid]
                up = {i for i in (v.parent_id, v.plan_id, v.harmonisation_id) if i is not None and i in rows}
                ancestors[vid] = set(up).union(*(ancestors[i] for i in up))
            out = []
            for vid in sorted(rows):
                via = tuple(sorted(ancestors[vid] & direct))
                if vid in direct or via:
                    out.append(Touch(self._view(s, rows[vid]), vid in direct, via))
            return out

    def artifact_bytes(self, ref: str | int) -> bytes:
        """The version's artifact, checked against its hash (raises :class:`ArtifactError` when damaged)."""
        v = self.version(ref)
        try:
            return self.store.read(v.artifact_sha256, v.artifact_size)
        except ArtifactError as exc:
            raise ArtifactError(f"{v.label} ({v.kind} {v.artifact_name}): {exc}") from exc

    def events(self, subject: str | None = None) -> list[Event]:
        """The audit log (or one subject's events, e.g. ``version:3``), in order."""
        with self._read() as s:
            q = select(AuditEvent).order_by(AuditEvent.seq)
            if subject:
                q = q.where(AuditEvent.subject == subject)
            return [audit.to_event(r) for r in s.execute(q).scalars()]

    def head(self) -> tuple[int, str]:
        """The last event's (seq, hash): publish it elsewhere to pin the log's state."""
        with self._read() as s:
            row = s.execute(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).scalar_one_or_none()
            return (row.seq, row.hash) if row else (0, audit.GENESIS)

    def study_config(self, study_hash: str) -> dict[str, Any]:
        """The recorded study configuration with this hash."""
        with self._read() as s:
            st = s.execute(select(Study).where(Study.config_hash == study_hash)).scalar_one_or_none()
            if st is None:
                raise RegistryError(f"no study with config hash {study_hash[:12]}... in the registry")
            return dict(json.loads(st.config_json))

    def _resolve(self, s: Session, ref: str | int) -> ModelVersion:
        text = str(ref).strip()
        hint = "Fix: run `fedbiopsy registry list` to see the versions"
        if m := _REF.match(text):
            v = s.get(ModelVersion, int(m.group(1)))
            if v is None:
                n = s.execute(select(func.count()).select_from(ModelVersion)).scalar_one()
                raise UnknownVersionError(f"no model version {text!r} in the registry {self.location.describe()} "
                                          f"({n} version(s) registered). {hint}")
            return v
        if m := _SHA.match(text):
            found = list(s.execute(select(ModelVersion).where(
                ModelVersion.artifact_sha256.startswith(m.group(1).lower())).order_by(ModelVersion.id)).scalars())
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise UnknownVersionError(f"artifact hash {text!r} matches versions "
                                          f"{', '.join(f'v{v.id}' for v in found)}. Fix: name one as v<id>")
        raise UnknownVersionError(f"no model version {text!r} in the registry {self.location.describe()} (use v<id>, "
                                  f"<id> or an artifact sha256 prefix of 8+ hex digits). {hint}")

    def _view(self, s: Session, v: ModelVersion) -> Version:
        run = s.get(Run, v.run_id)
        study = s.get(Study, run.study_id) if run else None
        phase = s.get(Phase, v.phase_id)
        art = s.get(Artifact, v.artifact_sha256)
        return Version(
            id=v.id, kind=v.kind, round=v.round, phase=phase.name if phase else "?", run_id=v.run_id,
            study_name=study.name if study else "?", study_hash=study.config_hash if study else "?",
            code_version=run.code_version if run else "?", git_commit=run.git_commit if run else None,
            parent_id=v.parent_id, plan_id=v.plan_id, harmonisation_id=v.harmonisation_id,
            artifact_sha256=v.artifact_sha256, artifact_name=art.name if art else "?",
            artifact_size=art.size if art else 0,
            settings_hash=v.settings_hash, preprocessing_hash=v.preprocessing_hash,
            metrics=json.loads(v.metrics_json), epsilon=json.loads(v.epsilon_json), delta=v.delta,
            extra=json.loads(v.extra_json), created_at=v.created_at,
            sites=tuple(SiteData(x.site_id, x.n_cases, x.manifest_hash, x.manifest_cases) for x in v.sites))

    # --- verification ------------------------------------------------------------------------------------------
    def verify(self, expected_head: str | None = None, artifacts: bool | Iterable[str] = True) -> VerifyReport:
        """Recompute the audit chain, compare every record with its audit snapshot and re-hash every artifact.

        ``expected_head``: a hash published earlier by :meth:`head`; it must still be in the log.
        ``artifacts``: False to skip re-hashing artifacts, or the sha256 of the only ones to re-hash.
        """
        with self._read() as s:
            return verify_registry(s, self.store, expected_head, artifacts)


def _fingerprints(phase: str, output: Mapping[str, Any]) -> dict[str, tuple[str | None, int | None]]:
    raw = output.get("data_fingerprints") if isinstance(output, Mapping) else None
    if not raw:
        return {}
    if not isinstance(raw, Mapping):
        raise RegistryError(f"phase {phase!r}: 'data_fingerprints' must map site ids to "
                            "{'manifest_hash', 'n_cases'}")
    out = {}
    for site, fp in raw.items():
        fp = fp if isinstance(fp, Mapping) else {}
        mh = fp.get("manifest_hash")
        n = fp.get("n_cases")
        out[str(site)] = (str(mh) if mh else None, int(n) if n is not None else None)
    return out


def open_registry(where: Path | str, url: str | None = None, create: bool = True) -> Registry:
    """Open (creating or migrating as needed) the registry in folder ``where``, or at SQLAlchemy URL ``where``.

    ``url``: a database URL when ``where`` is the artifact folder (default: ``where/registry.sqlite``).
    ``create=False`` raises :class:`RegistryError` when no registry is there (for read-only tools).
    """
    loc = resolve_location(where, url)
    db_file = loc.sqlite_file
    if db_file is not None:
        if not db_file.is_file() and not create:
            raise RegistryError(f"no registry at {loc.describe()} ({db_file} does not exist). Fix: pass "
                                "--registry with the folder or URL of an existing registry")
        db_file.parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(loc.url)
    try:
        if not create:
            with engine.connect() as conn:
                if current_version(conn) == 0:
                    raise RegistryError(f"no registry at {loc.describe()} (the database is empty)")
        migrate(engine.execution_options(immediate=True), backup=db_file, on_migrated=_note_migration)
    except DatabaseError as exc:
        engine.dispose()
        raise RegistryError(f"cannot open the registry database at {loc.describe()} ({exc.orig}). Fix: pass a "
                            "registry folder or database URL; restore a damaged database from a copy") from exc
    except BaseException:
        engine.dispose()
        raise
    return Registry(loc, engine)


def _note_migration(s: Session, before: int, after: int) -> None:
    if before == 0:
        audit.append(s, "registry.created", "registry", {"schema_version": after})
    else:
        audit.append(s, "registry.migrated", "registry", {"from_schema": before, "to_schema": after})
    log.info("registry: schema %d -> %d", before, after)


__all__ = ["Registry", "open_registry"]
