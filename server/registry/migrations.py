"""Schema migrations: an explicit, ordered list, recorded in the ``schema_version`` table.

Each migration is plain SQLAlchemy Core DDL against a frozen description of the tables it creates, so
that migrating an old registry reproduces exactly the schema a new one gets (a test compares both with
:mod:`.models`). All pending migrations run in one transaction: a failure leaves the registry as it was.
SQLite files are also copied to ``<file>.schema-v<N>.bak`` before they are migrated.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    select,
    text,
)
from sqlalchemy.orm import Session

from server.registry.errors import SchemaError

log = logging.getLogger(__name__)
GENESIS = "0" * 64


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# --- schema 1, frozen -------------------------------------------------------------------------------------------
_V1 = MetaData()
_H, _T = String(64), String(40)
Table("schema_version", _V1, Column("version", Integer, primary_key=True, autoincrement=False),
      Column("description", Text, nullable=False), Column("applied_at", _T, nullable=False))
Table("studies", _V1, Column("id", Integer, primary_key=True), Column("name", String(200), nullable=False),
      Column("config_hash", _H, nullable=False, unique=True), Column("config_json", Text, nullable=False),
      Column("created_at", _T, nullable=False))
Table("runs", _V1, Column("id", Integer, primary_key=True),
      Column("study_id", Integer, ForeignKey("studies.id"), nullable=False),
      Column("started_at", _T, nullable=False), Column("finished_at", _T), Column("status", String(20), nullable=False),
      Column("code_version", String(100), nullable=False), Column("git_commit", String(40)),
      Column("git_dirty", Boolean), Column("result_dir", Text), Column("error", Text))
Table("phases", _V1, Column("id", Integer, primary_key=True),
      Column("run_id", Integer, ForeignKey("runs.id"), nullable=False), Column("name", String(100), nullable=False),
      Column("ordinal", Integer, nullable=False), Column("output_hash", _H, nullable=False),
      Column("recorded_at", _T, nullable=False), UniqueConstraint("run_id", "ordinal"))
Table("participations", _V1, Column("id", Integer, primary_key=True),
      Column("phase_id", Integer, ForeignKey("phases.id"), nullable=False),
      Column("site_id", String(200), nullable=False), Column("n_cases", Integer, nullable=False),
      Column("manifest_hash", _H), Column("manifest_cases", Integer), UniqueConstraint("phase_id", "site_id"))
Table("artifacts", _V1, Column("sha256", _H, primary_key=True), Column("size", BigInteger, nullable=False),
      Column("name", String(255), nullable=False), Column("created_at", _T, nullable=False))
Table("model_versions", _V1, Column("id", Integer, primary_key=True),
      Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
      Column("phase_id", Integer, ForeignKey("phases.id"), nullable=False),
      Column("kind", String(40), nullable=False), Column("round", Integer),
      Column("parent_id", Integer, ForeignKey("model_versions.id")),
      Column("plan_id", Integer, ForeignKey("model_versions.id")),
      Column("harmonisation_id", Integer, ForeignKey("model_versions.id")),
      Column("artifact_sha256", _H, ForeignKey("artifacts.sha256"), nullable=False),
      Column("settings_hash", _H), Column("metrics_json", Text, nullable=False),
      Column("epsilon_json", Text, nullable=False), Column("extra_json", Text, nullable=False),
      Column("created_at", _T, nullable=False))
Table("version_sites", _V1, Column("version_id", Integer, ForeignKey("model_versions.id"), primary_key=True),
      Column("site_id", String(200), primary_key=True), Column("n_cases", Integer, nullable=False),
      Column("manifest_hash", _H), Column("manifest_cases", Integer))
Table("audit_events", _V1, Column("seq", Integer, primary_key=True, autoincrement=False),
      Column("ts", _T, nullable=False), Column("kind", String(60), nullable=False),
      Column("subject", String(200), nullable=False), Column("payload", Text, nullable=False),
      Column("prev_hash", _H, nullable=False, unique=True), Column("hash", _H, nullable=False, unique=True))

# --- schema 2, frozen -------------------------------------------------------------------------------------------
_V2 = MetaData()
_AUDIT_HEAD_V2 = Table("audit_head", _V2, Column("id", Integer, primary_key=True, autoincrement=False),
                       Column("seq", Integer, nullable=False), Column("hash", _H, nullable=False))


def _v1(conn: Connection) -> None:
    _V1.create_all(conn)


def _v2(conn: Connection) -> None:
    _V2.create_all(conn)
    last = conn.execute(text("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")).first()
    conn.execute(_AUDIT_HEAD_V2.insert().values(id=1, seq=last[0] if last else 0, hash=last[1] if last else GENESIS))
    conn.execute(text("ALTER TABLE model_versions ADD COLUMN preprocessing_hash VARCHAR(64)"))
    conn.execute(text("ALTER TABLE model_versions ADD COLUMN delta FLOAT"))


@dataclass(frozen=True)
class Migration:
    """One schema step: its version number, what it changes, and the DDL/data change itself."""

    version: int
    description: str
    apply: Callable[[Connection], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "studies, runs, phases, participations, artifacts, model versions, hash-chained audit log", _v1),
    Migration(2, "audit head anchor (reveals events cut from the end); DP delta and preprocessing hash", _v2),
)
SCHEMA_VERSION = MIGRATIONS[-1].version
REGISTRY_TABLES = frozenset(_V1.tables) | frozenset(_V2.tables)


def current_version(conn: Connection) -> int:
    """The schema version of the database behind ``conn`` (0: empty); raises on a foreign/damaged one."""
    tables = set(inspect(conn).get_table_names())
    if "schema_version" not in tables:
        ours = sorted(tables & REGISTRY_TABLES)
        if ours:
            raise SchemaError(f"the database holds registry tables {ours} but no schema_version table: it is damaged "
                              "or was not made by fedbiopsy. Fix: restore it from a copy, or use a new registry")
        return 0
    found = conn.execute(text("SELECT MAX(version) FROM schema_version")).scalar()
    return int(found or 0)


def migrate(engine: Engine, target: int | None = None, backup: Path | None = None,
            on_migrated: Callable[[Session, int, int], None] | None = None) -> tuple[int, int]:
    """Bring the database to schema ``target`` (default: the latest); returns (version before, version after).

    ``engine`` must take the database's write lock when a transaction begins (see :mod:`.database`), so that
    two processes opening a new registry at once create it once. ``backup``: an SQLite file to copy first.
    ``on_migrated(session, before, after)`` runs in the same transaction once the latest schema is reached
    (the registry logs the creation or migration as an audit event there).
    """
    goal = SCHEMA_VERSION if target is None else target
    with engine.begin() as conn:
        before = current_version(conn)
        if before > SCHEMA_VERSION:
            raise SchemaError(f"the registry has schema version {before}, newer than this fedbiopsy knows "
                              f"({SCHEMA_VERSION}). Fix: upgrade fedbiopsy; nothing was changed")
        if before >= goal:
            return before, before
        if before > 0 and backup is not None and backup.is_file():
            copy = backup.with_name(f"{backup.name}.schema-v{before}.bak")
            shutil.copy2(backup, copy)
            log.info("registry: copied %s to %s before migrating", backup, copy)
        for step in MIGRATIONS[before:goal]:
            log.info("registry: migrating schema %d -> %d (%s)", step.version - 1, step.version, step.description)
            step.apply(conn)
            conn.execute(_V1.tables["schema_version"].insert().values(
                version=step.version, description=step.description, applied_at=_now()))
        after = int(conn.execute(select(_V1.tables["schema_version"].c.version).order_by(
            _V1.tables["schema_version"].c.version.desc())).scalar() or 0)
        if on_migrated is not None and after == SCHEMA_VERSION:
            with Session(bind=conn) as session:
                on_migrated(session, before, after)
                session.flush()
    return before, after
