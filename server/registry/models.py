"""The registry's tables (SQLAlchemy 2 ORM), at the latest schema version (see :mod:`.migrations`).

Timestamps are ISO-8601 UTC strings and JSON fields are canonical JSON text, so that every record reads
back byte-identical on any database and its audit-event snapshot can be compared exactly.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

HASH = String(64)
STAMP = String(40)


class Base(DeclarativeBase):
    """Declarative base of the registry tables."""


class SchemaVersion(Base):
    """One applied schema migration."""

    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    description: Mapped[str] = mapped_column(Text)
    applied_at: Mapped[str] = mapped_column(STAMP)


class Study(Base):
    """A study configuration, once per config hash."""

    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    config_hash: Mapped[str] = mapped_column(HASH, unique=True)
    config_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(STAMP)


class Run(Base):
    """One execution of a study by one code version."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    started_at: Mapped[str] = mapped_column(STAMP)
    finished_at: Mapped[str | None] = mapped_column(STAMP, nullable=True)
    status: Mapped[str] = mapped_column(String(20))
    code_version: Mapped[str] = mapped_column(String(100))
    git_commit: Mapped[str | None] = mapped_column(String(40), nullable=True)
    git_dirty: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    result_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Phase(Base):
    """A finished phase of a run, with a hash of its output."""

    __tablename__ = "phases"
    __table_args__ = (UniqueConstraint("run_id", "ordinal"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    name: Mapped[str] = mapped_column(String(100))
    ordinal: Mapped[int] = mapped_column(Integer)
    output_hash: Mapped[str] = mapped_column(HASH)
    recorded_at: Mapped[str] = mapped_column(STAMP)
    participations: Mapped[list[Participation]] = relationship(order_by="Participation.site_id")


class Participation(Base):
    """A site whose data contributed to a phase, with its data fingerprint (never patient identifiers)."""

    __tablename__ = "participations"
    __table_args__ = (UniqueConstraint("phase_id", "site_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    phase_id: Mapped[int] = mapped_column(ForeignKey("phases.id"))
    site_id: Mapped[str] = mapped_column(String(200))
    n_cases: Mapped[int] = mapped_column(Integer)
    manifest_hash: Mapped[str | None] = mapped_column(HASH, nullable=True)
    manifest_cases: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Artifact(Base):
    """A file in the content-addressed store, by the sha256 of its bytes."""

    __tablename__ = "artifacts"
    sha256: Mapped[str] = mapped_column(HASH, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[str] = mapped_column(STAMP)


class ModelVersion(Base):
    """A registered model or statistic (plan, segmentation, classifier, harmonisation, signature, outcomes)."""

    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    phase_id: Mapped[int] = mapped_column(ForeignKey("phases.id"))
    kind: Mapped[str] = mapped_column(String(40))
    round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    harmonisation_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    settings_hash: Mapped[str | None] = mapped_column(HASH, nullable=True)
    preprocessing_hash: Mapped[str | None] = mapped_column(HASH, nullable=True)  # schema 2
    metrics_json: Mapped[str] = mapped_column(Text)
    epsilon_json: Mapped[str] = mapped_column(Text)
    delta: Mapped[float | None] = mapped_column(Float, nullable=True)  # schema 2
    extra_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(STAMP)
    sites: Mapped[list[VersionSite]] = relationship(order_by="VersionSite.site_id")


class VersionSite(Base):
    """A site whose data contributed to a model version, with its data fingerprint."""

    __tablename__ = "version_sites"
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    site_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    n_cases: Mapped[int] = mapped_column(Integer)
    manifest_hash: Mapped[str | None] = mapped_column(HASH, nullable=True)
    manifest_cases: Mapped[int | None] = mapped_column(Integer, nullable=True)


class AuditEvent(Base):
    """One append-only, hash-chained audit event (see :mod:`.audit`)."""

    __tablename__ = "audit_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts: Mapped[str] = mapped_column(STAMP)
    kind: Mapped[str] = mapped_column(String(60))
    subject: Mapped[str] = mapped_column(String(200))
    payload: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(HASH, unique=True)
    hash: Mapped[str] = mapped_column(HASH, unique=True)


class AuditHead(Base):
    """The last event's sequence number and hash (one row, id 1): the lock appenders take, and an anchor
    that reveals events removed from the end of the log (schema 2)."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(HASH)
