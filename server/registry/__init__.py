"""The traceable model registry and its tamper-evident audit trail (FUTURE-AI Traceability).

A registry is a folder holding a content-addressed artifact store (``artifacts/<sha[:2]>/<sha256>``) and, by
default, an SQLite database ``registry.sqlite``; any SQLAlchemy URL can hold the database instead (e.g.
PostgreSQL), with the folder still holding the artifacts. Nothing inside refers to the folder's own path, so
a copied registry works and verifies. The schema is versioned (``schema_version`` table) and migrated on open.

Python API (everything here; the rest of the package is implementation)::

    reg = open_registry("registry/")               # or open_registry(folder, url="postgresql+psycopg://...")
    run = reg.start_run(study, result_dir)         # records the study (config JSON + hash) and code version
    reg.record_phase(run, "fingerprint", output, participants, result_dir)  # -> [Version, ...]
    reg.finish_run(run)                            # or finish_run(run, error="...") -> status "failed"
    reg.versions(kind=None, site=None, run_id=None) -> [Version]      reg.version("v3" | 3 | "<sha prefix>")
    reg.lineage("v3") -> [Version]  newest first: the version and all it derives from (parent, plan, harmonisation)
    reg.touched_by("site-2") -> [Touch(version, direct, via)]   every version the site's data reached
    reg.verify(expected_head=None) -> VerifyReport(ok, first, broken, ...)
    reg.artifact_bytes("v3"); reg.events(subject=None); reg.head(); reg.append_event(kind, subject, payload)
    model_card(reg, "v3") -> dict;  card_markdown(card) -> str;  export_version(reg, "v3", dest_dir)

The phase contract (server/study.py calls :meth:`Registry.record_phase` after each phase): a phase returns
``"artifacts": [{"kind": "plan"|"segmentation"|"classifier"|"harmonisation"|"signature"|"outcomes"|"prognosis",
"path": file (relative: to the result folder), "round": int|None, "metrics": {site_id|"pooled": {name: float}},
"epsilon": {site_id: float}, "delta": float, "settings_hash": str, "preprocessing_hash": str,
"parent_kind": kind, "participants": {site_id: n_cases}}]`` (all but kind and path optional) and sets
``ctx.participants[phase] = {site_id: n_cases}``; a phase may return ``"data_fingerprints": {site_id:
{"manifest_hash": str, "n_cases": int}}`` (the fingerprint phase does), which later phases of the run inherit.

Parents: ``parent_kind`` names the latest version of that kind in the run; otherwise the previous round of
the same kind in the same phase; otherwise the run's latest plan (so a preprocessing or network plan derives
from the fingerprint plan). Each version also records the run's latest plan and harmonisation. Lineage and
touched-by follow all three links; touched-by marks each version ``direct`` or ``via`` the ancestors the site fed.

Tamper evidence has one limit: someone able to rewrite the whole database can rewrite the chain consistently;
publish :meth:`Registry.head` elsewhere (report, ticket, signed e-mail) and pass it to ``verify(expected_head=)``
(``fedbiopsy registry verify --head``) to detect that too.

Audit log: every write appends an event hash-chained to the previous one (:mod:`.audit`) carrying a snapshot
of the rows it wrote; ``verify`` recomputes the chain, compares every row with its snapshot and re-hashes
every artifact, naming the first broken link. Writers serialise on the database write lock (SQLite:
``BEGIN IMMEDIATE``), so concurrent processes never lose or fork events.
"""

from __future__ import annotations

from server.registry.audit import Broken, Event
from server.registry.card import card_markdown, model_card
from server.registry.errors import ArtifactError, RegistryError, SchemaError, UnknownVersionError
from server.registry.export import export_version
from server.registry.migrations import SCHEMA_VERSION
from server.registry.records import KINDS, SiteData, Touch, Version
from server.registry.registry import Registry, open_registry
from server.registry.verify import VerifyReport

__all__ = [
    "KINDS", "SCHEMA_VERSION", "ArtifactError", "Broken", "Event", "Registry", "RegistryError", "SchemaError",
    "SiteData", "Touch", "UnknownVersionError", "Version", "VerifyReport", "card_markdown", "export_version",
    "model_card", "open_registry",
]
