"""Tamper evidence: any edit, deletion or reordering of audit rows, records or artifact bytes fails ``verify``."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from server.registry import Registry
from server.registry.audit import chain_hash

N_EVENTS = 19  # build_history: registry.created + 11 events for run 1 + 7 for run 2


def _db(reg: Registry) -> sqlite3.Connection:
    path = reg.location.sqlite_file
    assert path is not None
    return sqlite3.connect(path, isolation_level=None)


def _edit_payload(db: sqlite3.Connection) -> None:
    db.execute("UPDATE audit_events SET payload = replace(payload, '\"round\":1', '\"round\":9') WHERE seq = 9")


def _edit_time(db: sqlite3.Connection) -> None:
    db.execute("UPDATE audit_events SET ts = '2020-01-01T00:00:00+00:00' WHERE seq = 5")


def _delete_row(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM audit_events WHERE seq = 7")


def _swap_contents(db: sqlite3.Connection) -> None:  # rows 10 and 11 exchange everything but their numbers
    cols = "ts, kind, subject, payload, prev_hash, hash"
    r10 = db.execute(f"SELECT {cols} FROM audit_events WHERE seq = 10").fetchone()
    r11 = db.execute(f"SELECT {cols} FROM audit_events WHERE seq = 11").fetchone()
    db.execute("UPDATE audit_events SET prev_hash = 'x', hash = 'y' WHERE seq = 10")  # free the unique values
    sets = ", ".join(f"{c} = ?" for c in cols.split(", "))
    db.execute(f"UPDATE audit_events SET {sets} WHERE seq = 11", r10)
    db.execute(f"UPDATE audit_events SET {sets} WHERE seq = 10", r11)


def _swap_numbers(db: sqlite3.Connection) -> None:  # rows 10 and 11 exchange their sequence numbers
    db.execute("UPDATE audit_events SET seq = -1 WHERE seq = 10")
    db.execute("UPDATE audit_events SET seq = 10 WHERE seq = 11")
    db.execute("UPDATE audit_events SET seq = 11 WHERE seq = -1")


def _delete_last(db: sqlite3.Connection) -> None:
    db.execute(f"DELETE FROM audit_events WHERE seq = {N_EVENTS}")


def _edit_metrics(db: sqlite3.Connection) -> None:
    db.execute("UPDATE model_versions SET metrics_json = replace(metrics_json, '0.65', '0.95') WHERE id = 5")


def _hide_site(db: sqlite3.Connection) -> None:  # erase site E's contribution to v4 (a withdrawal cover-up)
    db.execute("DELETE FROM version_sites WHERE version_id = 4 AND site_id = 'E'")


def _edit_config(db: sqlite3.Connection) -> None:
    db.execute("UPDATE studies SET config_json = replace(config_json, '\"seed\":0', '\"seed\":1') WHERE id = 1")


@pytest.mark.parametrize(("tamper", "where", "problem"), [
    (_edit_payload, "audit event #9", "does not match its hash"),
    (_edit_time, "audit event #5", "does not match its hash"),
    (_delete_row, "audit event #7", "missing"),
    (_swap_contents, "audit event #10", "does not link to the event before it"),
    (_swap_numbers, "audit event #10", "does not link to the event before it"),
    (_delete_last, "audit head", f"ends at #{N_EVENTS - 1}"),
    (_edit_metrics, "model version v5", "differs from its audit event #11 in metrics"),
    (_hide_site, "model version v4", "differs from its audit event #10 in sites"),
    (_edit_config, "study 1 (s1)", "does not match its hash"),
])
def test_verify_names_the_first_broken_row(history: Registry, tamper: Callable, where: str, problem: str) -> None:
    before = history.verify()
    assert before.ok and before.n_events == N_EVENTS and before.n_versions == 7
    db = _db(history)
    tamper(db)
    db.close()
    report = history.verify()
    assert not report.ok
    assert report.first is not None and report.first.where == where and problem in report.first.problem, report.broken


def _artifact(history: Registry, ref: str) -> Path:
    return history.store.path_of(history.version(ref).artifact_sha256)


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:]), "has changed"),
    (lambda p: p.write_bytes(p.read_bytes()[:4]), "is truncated: 4 of 15 bytes"),
    (lambda p: p.unlink(), "is missing"),
])
def test_verify_names_a_damaged_artifact(history: Registry, damage: Callable[[Path], object], problem: str) -> None:
    path = _artifact(history, "v5")
    damage(path)
    report = history.verify()
    assert not report.ok and len(report.broken) == 1
    assert report.first.where.startswith(f"artifact {history.version('v5').artifact_sha256[:12]} (clf3.pt, v5)")
    assert problem in report.first.problem


def test_a_consistent_rewrite_is_caught_by_the_published_head(history: Registry) -> None:
    """An attacker who edits a record *and* its snapshot and re-hashes the rest of the chain defeats the chain
    alone; a head published before the rewrite still exposes it."""
    _, published = history.head()
    db = _db(history)
    db.execute("UPDATE model_versions SET metrics_json = replace(metrics_json, '0.65', '0.95') WHERE id = 5")
    db.execute("UPDATE audit_events SET payload = replace(payload, '0.65', '0.95') WHERE seq = 11")
    prev = db.execute("SELECT hash FROM audit_events WHERE seq = 10").fetchone()[0]
    rows = db.execute("SELECT seq, ts, kind, subject, payload FROM audit_events WHERE seq > 10 ORDER BY seq").fetchall()
    db.execute("UPDATE audit_events SET prev_hash = 'p' || seq, hash = 'h' || seq WHERE seq >= 11")
    for seq, ts, kind, subject, payload in rows:
        h = chain_hash(seq, ts, kind, subject, payload, prev)
        db.execute("UPDATE audit_events SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, h, seq))
        prev = h
    db.execute("UPDATE audit_head SET hash = ? WHERE id = 1", (prev,))
    db.close()
    assert history.verify().ok  # undetectable from inside the registry alone ...
    report = history.verify(expected_head=published)
    assert not report.ok and report.first.where == "audit head" and "not in the log" in report.first.problem


def test_the_log_may_grow_after_a_published_head(history: Registry) -> None:
    _, published = history.head()
    history.append_event("version.promoted", "version:5", {"by": "qa-lead"})
    assert history.verify(expected_head=published).ok


def test_a_consistent_truncation_is_caught_by_the_full_published_head(history: Registry) -> None:
    """Erasing the whole second run -- its rows and its events -- and moving the head row back is consistent
    (the registry alone verifies); the head published after the run, ``<seq>:<sha256>`` as study.json and
    registry-head.txt hold it, exposes it."""
    from server.registry.verify import format_head, parse_head

    published = format_head(history.head())
    assert parse_head(published) == (N_EVENTS, history.head()[1])
    db = _db(history)
    db.execute("DELETE FROM version_sites WHERE version_id IN (SELECT id FROM model_versions WHERE run_id = 2)")
    db.execute("DELETE FROM model_versions WHERE run_id = 2")
    db.execute("DELETE FROM participations WHERE phase_id IN (SELECT id FROM phases WHERE run_id = 2)")
    db.execute("DELETE FROM phases WHERE run_id = 2")
    db.execute("DELETE FROM runs WHERE id = 2")
    db.execute("DELETE FROM studies WHERE id NOT IN (SELECT study_id FROM runs)")
    db.execute("DELETE FROM audit_events WHERE seq >= 13")  # study 2 recorded .. run 2 finished
    seq, h = db.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
    db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, h))
    db.close()
    assert history.verify(artifacts=False).ok  # undetectable from inside the registry alone
    report = history.verify(expected_head=published, artifacts=False)
    assert not report.ok and report.first.where == "audit head" and "truncated or rewritten" in report.first.problem
    # a head with the right hash but another sequence number is not the published one either
    assert not history.verify(expected_head=f"{seq + 1}:{h}", artifacts=False).ok
    assert history.verify(expected_head=f"{seq}:{h}", artifacts=False).ok
    for bad in ("12:abc", "x:" + "0" * 64, "not a head"):
        with pytest.raises(Exception, match="--head"):
            history.verify(expected_head=bad)
