"""Where a registry lives and how its database is opened.

A registry is a *folder* (the artifact store, and by default the SQLite database ``registry.sqlite``)
plus a SQLAlchemy *URL* (default: that SQLite file; any other URL, e.g. ``postgresql+psycopg://...``, works).
Nothing stored inside refers to the folder's absolute path, so a copied folder is a working registry.

Writers serialise on the database's write lock: on SQLite every write transaction starts with
``BEGIN IMMEDIATE`` (and waits up to ``busy_timeout`` for another process's write to finish); on other
databases every write transaction first locks the ``audit_head`` row (``SELECT ... FOR UPDATE``). On such
databases, create the registry (open it once) before several processes use it at the same time.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from server.registry.errors import RegistryError

DB_FILE = "registry.sqlite"
ARTIFACT_DIR = "artifacts"
BUSY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Location:
    """A resolved registry: its database URL and its folder (artifacts under ``folder/artifacts``)."""

    url: str
    folder: Path

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite database file, when the database is one."""
        u = make_url(self.url)
        if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
            return Path(u.database)
        return None

    def describe(self) -> str:
        """The location as a user wrote it (passwords hidden)."""
        return str(self.folder) if self.url == default_url(self.folder) else make_url(self.url).render_as_string()


def default_url(folder: Path) -> str:
    """The SQLite URL of the registry database inside ``folder``."""
    return f"sqlite:///{(folder / DB_FILE).resolve()}"


def resolve_location(where: Path | str, url: str | None = None) -> Location:
    """A registry location from a folder, or from a SQLAlchemy URL (``where`` containing ``://``).

    With a URL and no separate folder, an SQLite URL keeps its artifacts beside its database file;
    any other URL needs ``url=...`` with ``where`` the artifact folder.
    """
    text = str(where)
    if "://" in text:
        if url:
            raise RegistryError(f"two database URLs given ({text!r} and {url!r}). Fix: pass one URL and a folder")
        url = text
        try:
            db = make_url(url)
        except ArgumentError as exc:
            raise RegistryError(f"{url!r} is not a SQLAlchemy database URL ({exc}). Fix: use e.g. "
                                "sqlite:////abs/registry.sqlite or postgresql+psycopg://user@host/db") from exc
        if db.get_backend_name() != "sqlite" or not db.database or db.database == ":memory:":
            raise RegistryError(f"the registry at {db.render_as_string()} needs a folder for its artifacts. Fix: "
                                "pass the folder as the location and the URL separately (StudyConfig.registry.url)")
        return Location(url, Path(db.database).resolve().parent)
    folder = Path(text).expanduser().resolve()
    if url:
        try:
            make_url(url)
        except ArgumentError as exc:
            raise RegistryError(f"{url!r} is not a SQLAlchemy database URL ({exc})") from exc
    return Location(url or default_url(folder), folder)


def make_engine(url: str) -> Engine:
    """An engine whose transactions take the write lock when opened with ``execution_options(immediate=True)``."""
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError as exc:
        raise RegistryError(f"{url!r} is not a SQLAlchemy database URL ({exc})") from exc
    if backend != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        dbapi_conn.execute("PRAGMA foreign_keys=ON")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    return engine
