"""The append-only, hash-chained audit log.

Event ``n`` stores ``hash_n = sha256(canonical_json([n, ts, kind, subject, payload_text, hash_{n-1}]))``
with ``hash_0 = "0" * 64``; sequence numbers run 1, 2, 3, ... without gaps. Changing any stored field,
deleting a row or moving rows breaks the recomputation at the first affected event; the ``audit_head``
row (last seq and hash) reveals events cut from the end, and publishing :meth:`Registry.head` elsewhere
makes even a rewrite of the whole log evident.

Appending reads the head under the database's write lock (``BEGIN IMMEDIATE`` on SQLite, ``FOR UPDATE``
on the head row elsewhere), inside the caller's transaction, so concurrent writers never fork the chain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.hashing import canonical_json, sha256_text
from server.registry.errors import RegistryError
from server.registry.migrations import GENESIS
from server.registry.models import AuditEvent, AuditHead


@dataclass(frozen=True)
class Event:
    """One audit event as read back."""

    seq: int
    ts: str
    kind: str
    subject: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Broken:
    """A verification failure: what is at fault (e.g. ``audit event #12``) and how."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


def now() -> str:
    """The current UTC time as an ISO-8601 string (microseconds)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def chain_hash(seq: int, ts: str, kind: str, subject: str, payload_text: str, prev_hash: str) -> str:
    """The hash of an event given the previous event's hash."""
    return sha256_text(canonical_json([seq, ts, kind, subject, payload_text, prev_hash]))


def append(session: Session, kind: str, subject: str, payload: dict[str, Any]) -> AuditEvent:
    """Append one event in ``session``'s (write) transaction; the caller commits."""
    head = session.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()).scalar_one_or_none()
    if head is None:
        raise RegistryError("the registry has no audit head row: its schema is damaged. Fix: restore it from a copy")
    text = canonical_json(payload)
    ts = now()
    seq = head.seq + 1
    row = AuditEvent(seq=seq, ts=ts, kind=kind, subject=subject, payload=text, prev_hash=head.hash,
                     hash=chain_hash(seq, ts, kind, subject, text, head.hash))
    session.add(row)
    head.seq, head.hash = seq, row.hash
    session.flush()
    return row


def to_event(row: AuditEvent) -> Event:
    """A detached, parsed copy of an event row (payloads that do not parse come back as ``{"unparsed": text}``)."""
    try:
        payload = json.loads(row.payload)
    except ValueError:
        payload = {"unparsed": row.payload}
    return Event(row.seq, row.ts, row.kind, row.subject, payload, row.prev_hash, row.hash)


def verify_chain(session: Session) -> tuple[list[Broken], int]:
    """Recompute the chain; returns the failures in log order and the number of events read."""
    broken: list[Broken] = []
    prev, expected, count = GENESIS, 1, 0
    for row in session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars():
        count += 1
        where = f"audit event #{row.seq}"
        if row.seq != expected:
            missing = f"#{expected}" if row.seq == expected + 1 else f"#{expected}..#{row.seq - 1}"
            broken.append(Broken(f"audit event {missing}", f"missing: the log jumps from #{expected - 1} to #{row.seq} "
                                 "(rows deleted)"))
        if row.prev_hash != prev:
            broken.append(Broken(where, "does not link to the event before it (rows deleted, inserted or reordered)"))
        if chain_hash(row.seq, row.ts, row.kind, row.subject, row.payload, row.prev_hash) != row.hash:
            broken.append(Broken(where, f"its content ({row.kind} {row.subject}) does not match its hash "
                                 "(the row was edited or moved)"))
        prev, expected = row.hash, row.seq + 1
    head = session.get(AuditHead, 1)
    if head is None:
        broken.append(Broken("audit head", "missing (the schema is damaged)"))
    elif (head.seq, head.hash) != (expected - 1, prev):
        broken.append(Broken("audit head", f"says the log ends at #{head.seq} but it ends at #{expected - 1}: events "
                             "were removed from the end, or the head was edited"))
    return broken, count
