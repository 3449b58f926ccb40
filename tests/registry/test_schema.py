"""Schema versions and migrations: new registries match the models; old ones migrate without loss."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, inspect, select

from common.hashing import sha256_file
from server.registry import SCHEMA_VERSION, Registry, RegistryError, SchemaError, open_registry
from server.registry.database import DB_FILE, default_url, make_engine
from server.registry.migrations import migrate
from server.registry.models import Base
from tests.registry.history import build_history


def _columns(url: str) -> dict[str, set[str]]:
    engine = create_engine(url)
    try:
        insp = inspect(engine)
        return {t: {c["name"] for c in insp.get_columns(t)} for t in insp.get_table_names()}
    finally:
        engine.dispose()


def test_a_new_registry_has_exactly_the_models_schema(registry: Registry) -> None:
    assert _columns(registry.location.url) == {t.name: {c.name for c in t.columns} for t in Base.metadata.sorted_tables}
    with sqlite3.connect(registry.location.sqlite_file) as db:
        assert [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2]
    assert SCHEMA_VERSION == 2
    assert [e.kind for e in registry.events()] == ["registry.created"]


def test_a_registry_of_an_older_schema_is_migrated_and_nothing_is_lost(tmp_path: Path) -> None:
    # Prepare: a registry with history, copied row by row into a database made by the schema-1 migration only
    with open_registry(tmp_path / "new") as src:
        build_history(src, tmp_path / "results", dp_delta=None)
        expected_versions, expected_events = src.versions(), src.events()
    old = tmp_path / "old"
    old.mkdir()
    engine = make_engine(default_url(old))
    assert migrate(engine.execution_options(immediate=True), target=1) == (0, 1)
    meta, src_engine = MetaData(), create_engine(default_url(tmp_path / "new"))
    meta.reflect(engine)
    with engine.begin() as dst, src_engine.connect() as s:
        for table in meta.sorted_tables:
            if table.name != "schema_version":
                rows = [dict(r._mapping) for r in s.execute(select(*table.columns))]
                if rows:
                    dst.execute(table.insert(), rows)
    engine.dispose()
    src_engine.dispose()
    (tmp_path / "new" / "artifacts").rename(old / "artifacts")
    assert set(_columns(default_url(old))) == set(Base.metadata.tables) - {"audit_head"}
    old_bytes = sha256_file(old / DB_FILE)

    # Execute
    with open_registry(old) as reg:
        versions, events, report = reg.versions(), reg.events(), reg.verify()

    # Assert: schema 2, a backup of the schema-1 file, every record and event kept, one migration event, verifies
    assert _columns(default_url(old)) == {t.name: {c.name for c in t.columns} for t in Base.metadata.sorted_tables}
    assert sha256_file(old / f"{DB_FILE}.schema-v1.bak") == old_bytes
    assert versions == expected_versions
    assert events[:-1] == expected_events
    assert events[-1].kind == "registry.migrated" and events[-1].payload == {"from_schema": 1, "to_schema": 2}
    assert report.ok, report.broken
    assert report.n_events == len(expected_events) + 1 and report.n_versions == 7


def test_a_newer_schema_is_refused_and_left_untouched(registry: Registry) -> None:
    path = registry.location.sqlite_file
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (99, 'from the future', '2031-01-01')")
    before = sha256_file(path)
    with pytest.raises(SchemaError, match="schema version 99, newer than this fedbiopsy knows .2.*upgrade fedbiopsy"):
        open_registry(registry.location.folder)
    assert sha256_file(path) == before


def test_a_damaged_or_foreign_database_is_refused(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    with sqlite3.connect(damaged / DB_FILE) as db:
        db.execute("CREATE TABLE studies (id INTEGER PRIMARY KEY)")
    with pytest.raises(SchemaError, match=r"registry tables \['studies'\] but no schema_version"):
        open_registry(damaged)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / DB_FILE).write_text("this is not a database " * 100)
    with pytest.raises(RegistryError, match="cannot open the registry database"):
        open_registry(garbage)


def test_read_only_tools_do_not_create_a_registry(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no registry at .*does not exist"):
        open_registry(tmp_path / "nowhere", create=False)
    assert not (tmp_path / "nowhere").exists()


def test_any_sqlalchemy_url_locates_a_registry(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'my.sqlite'}"
    with open_registry(url) as reg:
        assert reg.location.folder == tmp_path / "db" and reg.verify().ok
    with open_registry(tmp_path / "store", url=url) as reg:  # the same database, artifacts elsewhere
        assert reg.store.root == tmp_path / "store" / "artifacts" and len(reg.events()) == 1
    with pytest.raises(RegistryError, match="needs a folder for its artifacts"):
        open_registry("postgresql://user@localhost/fedbiopsy")
