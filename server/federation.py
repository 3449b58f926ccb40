"""The server's one way to reach the sites: Flower messages through a Grid, as a protocol's ``query``.

Every phase talks to the sites through :class:`FlowerQuery` (``ctx.query()``), the Flower implementation of
:class:`common.protocol.Query`; the protocol drivers in ``common/`` call it exactly as tests call
:class:`common.protocol.InMemoryQuery`. This module and ``server/app.py`` are the only server modules that
import Flower's messaging.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from common.config import StudyConfig
from common.errors import FedBiopsyError, ProtocolError
from common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    SITE_ID_KEY,
    STUDY_KEY,
    Payload,
    from_records,
    message_type,
    to_records,
    wire_array,
)

log = logging.getLogger("fedbiopsy.server")
_UNAVAILABLE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ReplyRejected(FedBiopsyError):
    """A reply the server does not count: its site id is not its node's, or it holds a non-finite number."""


_CHECKED_FINITE = ("train.", "evaluate.")  # model updates and evaluation replies: every number finite


def _finite(value: object) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind not in "fc" or bool(np.isfinite(value).all())
    if isinstance(value, (float, np.floating, complex, np.complexfloating)):
        return bool(np.isfinite(value))
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def check_finite(payload: Mapping[str, object]) -> None:
    """Raise :class:`ReplyRejected` naming the entry when a reply holds NaN or an infinity (arrays, numbers,
    lists of them)."""
    for key, value in payload.items():
        if not _finite(value):
            raise ReplyRejected(f"entry {key!r} holds a non-finite value")


def check_reply_values(kind: str, payload: Mapping[str, object]) -> None:
    """What every reply must pass before it counts: no object arrays, and for model updates and evaluation
    replies (``train.*``, ``evaluate.*``) only finite numbers. The statistics protocols check their own sums
    (a one-patient SD may be NaN there), see e.g. :func:`common.harmonisation_server.check_fit_reply`."""
    for key, value in payload.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "O":
            raise ReplyRejected(f"entry {key!r} is an object array")
    if kind.startswith(_CHECKED_FINITE):
        check_finite(payload)


def set_pull_backoff(initial_s: float = 0.05, cap_s: float = 1.0) -> bool:
    """Retry an object that is not uploaded yet after ``initial_s``, doubling up to ``cap_s``, in every object
    pull of this process (Flower 1.42: 1 s doubling up to 10 s, which a round pays whenever a message is picked
    up before its contents are in); False where Flower's pull functions are not the expected ones."""
    from flwr.supercore.inflatable import inflatable_utils

    defaults = [f.__kwdefaults__ for f in (inflatable_utils.pull_objects,
                                           inflatable_utils.pull_and_inflate_object_from_tree)]
    if not all(d and "initial_backoff" in d and "backoff_cap" in d for d in defaults):
        log.warning("flwr's object pulls have changed; keeping their own backoff")
        return False
    for kwdefaults in defaults:
        # as many tries as Flower's own schedule allows in time (~80 min), so a slow upload is not given up sooner
        kwdefaults.update(initial_backoff=initial_s, backoff_cap=cap_s,  # type: ignore[union-attr]
                          max_tries_per_object=5000)
    return True


class NotEnoughSitesError(FedBiopsyError):
    """Fewer sites answered than the study's minimum."""


def encode(payload: Mapping[str, object]) -> RecordDict:
    """A payload as a message's content: one ArrayRecord (the packed arrays), one ConfigRecord."""
    arrays, config = to_records(payload)
    return RecordDict({ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       CONFIG_KEY: ConfigRecord(config)})  # type: ignore[arg-type]


def decode(content: RecordDict) -> Payload:
    """A message's content as a payload (:func:`common.protocol.from_records`)."""
    arrays = content.array_records.get(ARRAYS_KEY)
    config = content.config_records.get(CONFIG_KEY)
    return from_records({k: wire_array(a.stype, a.data, a.numpy) for k, a in (arrays or {}).items()},
                        dict(config or {}))


@dataclass
class QueryResult:
    """One round: valid replies by site id, the refusals/errors by node, and the nodes that did not answer."""

    replies: dict[str, Payload] = field(default_factory=dict)
    node_of_site: dict[str, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)


class Federation:
    """The sites of one study run behind a Flower :class:`Grid` (simulation or deployment engine)."""

    def __init__(self, grid: Grid, study: StudyConfig, roster: Mapping[str, int] | None = None) -> None:
        self.grid = grid
        self.study = study
        self.node_ids: list[int] = []
        self.roster = {int(node): str(site) for site, node in (roster or {}).items()}  # node -> registered site
        self.site_of_node: dict[int, str] = {}  # every binding made in this run
        self.max_pull_interval_s = 0.25
        set_pull_backoff()

    def bind(self, node: int, claimed: object) -> str:
        """The site id of a reply from ``node``, bound to the node that sent it (raises :class:`ReplyRejected`).

        With a roster (run config ``site-nodes``: the node id the SuperLink gave each hospital's registered key;
        required on the deployment engine) a node answers only as its own site. Without one (the simulation
        engine), the first id a node answers with in the run is its own: it may not change it, nor take the id
        another node answered with.
        """
        if not isinstance(claimed, str) or not _SITE_ID.match(claimed):
            raise ReplyRejected(f"node {node}: the reply names no valid site id")
        if self.roster:
            if self.roster.get(node) != claimed:
                raise ReplyRejected(f"node {node}: the reply claims site {claimed!r}, the node is registered for "
                                    f"{self.roster.get(node)!r}")
        else:
            if self.site_of_node.get(node, claimed) != claimed:
                raise ReplyRejected(f"node {node} answered as site {self.site_of_node[node]!r}, now as {claimed!r}")
            holders = [n for n, site in self.site_of_node.items() if site == claimed and n != node]
            if holders:
                raise ReplyRejected(f"node {node}: site {claimed!r} answers from node {holders[0]}")
        self.site_of_node[node] = claimed
        return claimed

    def connected(self) -> list[int]:
        """The node ids connected now (with a roster, only the rostered ones: no other node is ever asked)."""
        ids = sorted(self.grid.get_node_ids())
        return [n for n in ids if n in self.roster] if self.roster else ids

    def wait(self, minimum: int, timeout_s: float = 120.0) -> list[int]:
        """The connected node ids, once at least ``minimum`` are there (raises after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ids = self.connected()
            if len(ids) >= minimum:
                self.node_ids = ids
                return ids
            if time.monotonic() > deadline:
                raise NotEnoughSitesError(f"only {len(ids)} site(s) connected after {timeout_s:.0f}s; need {minimum}")
            time.sleep(0.25)

    def query(self, nodes: list[int] | None = None, *, fixed: bool = True, minimum: int | None = None
              ) -> FlowerQuery:
        """A query over ``nodes`` (default: the nodes connected at the start of the run); see :class:`FlowerQuery`."""
        return FlowerQuery(self, list(self.node_ids if nodes is None else nodes), fixed=fixed, minimum=minimum)

    def _send_and_receive(self, messages: list[Message], timeout_s: float) -> list[Message]:
        """Push ``messages``, then pull their replies until all are in or ``timeout_s`` passes.

        Flower's ``Grid.send_and_receive`` does the same but pulls every 3 s on the deployment engine, which
        every round pays. Here the pause starts at 20 ms and grows by half up to :attr:`max_pull_interval_s`: a
        quick round is seen at once, a long one costs the SuperLink four small requests a second.
        """
        pending = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + timeout_s
        replies: list[Message] = []
        pause = 0.02
        while pending and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(1.5 * pause, self.max_pull_interval_s)
        return replies

    def send(self, action: str, payload: Mapping[str, object], nodes: list[int], minimum: int) -> QueryResult:
        """One round: ``action`` with ``payload`` to ``nodes``; raises when fewer than ``minimum`` answer validly."""
        study = self.study
        body = dict(payload)
        body[STUDY_KEY] = json.dumps(study.model_dump(mode="json"))
        content = encode(body)
        kind = message_type(action)
        # the message expires with the round: a site that comes back later does not compute for nothing
        messages = [Message(content, dst_node_id=node, message_type=kind, ttl=study.round_timeout_s) for node in nodes]
        dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        result = QueryResult()
        lost: set[int] = set()
        for reply in self._send_and_receive(messages, study.round_timeout_s):
            # the SuperLink answers for a node it lost (crashed, lease expired): map the reply to its query
            node = dst_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error() and reply.error.code in _UNAVAILABLE:
                lost.add(node)
            elif reply.has_error():
                result.errors[node] = str(reply.error.reason)
                log.warning("%s: node %s answered an error: %s", kind, node, reply.error.reason)
            else:
                try:
                    try:
                        content_in = decode(reply.content)
                    except ProtocolError as exc:
                        raise ReplyRejected(f"node {node}: the reply cannot be decoded ({exc.problem})") from exc
                    except Exception as exc:  # noqa: BLE001 - whatever a peer's bytes raise, its reply does not count
                        raise ReplyRejected(f"node {node}: the reply cannot be decoded ({type(exc).__name__})") from exc
                    site_id = self.bind(node, content_in.pop(SITE_ID_KEY, None))
                    check_reply_values(kind, content_in)
                except ReplyRejected as err:
                    result.errors[node] = f"reply rejected by the server: {err}"
                    log.warning("%s: %s", kind, result.errors[node])
                    continue
                result.replies[site_id] = content_in
                result.node_of_site[site_id] = node
        answered = set(result.errors) | set(result.node_of_site.values())
        result.dropped = [n for n in nodes if n not in answered]
        if result.dropped:
            log.warning("%s: node(s) %s dropped out (lost by the SuperLink: %s; no reply within %.0fs: %s)", kind,
                        result.dropped, sorted(lost), study.round_timeout_s, sorted(set(result.dropped) - lost))
        if len(result.replies) < minimum:
            reasons = "; ".join(result.errors.values()) or "no reply within the round timeout"
            raise NotEnoughSitesError(f"{kind}: {len(result.replies)} valid repl(ies), the study needs {minimum} "
                                      f"({reasons})")
        return result


class FlowerQuery:
    """``query(action, payload) -> {site_id: reply}`` over Flower messages (:class:`common.protocol.Query`).

    The first round goes to the given nodes and needs ``minimum`` valid replies (default: the study's
    ``min_sites``); whoever answers it is the cohort, and every later round goes to the cohort. With
    ``fixed`` (protocols that sum over rounds: ComBat, reduction, outcomes) every member must answer every
    later round, since a partial sum would be silently wrong; without it (training rounds) a round completes
    with ``minimum`` members and the others are listed in ``failures``.
    """

    def __init__(self, federation: Federation, nodes: list[int], *, fixed: bool = True,
                 minimum: int | None = None) -> None:
        self.federation = federation
        self.nodes = nodes
        self.fixed = fixed
        self.minimum = federation.study.min_sites if minimum is None else int(minimum)
        self.cohort: list[int] | None = None
        self.node_of_site: dict[str, int] = {}
        self.refused: dict[str, str] = {}  # first round: node label -> reason (refusal, error, no reply)
        self.failures: dict[str, str] = {}  # last round: site/node -> reason
        self.errors: dict[int, str] = {}  # every round: node -> the reason of its last error reply
        self.last = QueryResult()
        self.actions: list[str] = []
        self.seconds: dict[str, float] = {}  # wall time of each action's rounds (send, site steps, receive)

    def __call__(self, action: str, payload: Mapping[str, object]) -> dict[str, Payload]:
        """Run one round of ``action`` at the cohort; valid replies by site id."""
        first = self.cohort is None
        nodes = self.nodes if self.cohort is None else self.cohort
        need = self.minimum if first or not self.fixed else len(nodes)
        start = time.perf_counter()
        result = self.federation.send(action, payload, nodes, need)
        if self.cohort is None:
            self.cohort = sorted(result.node_of_site.values())
            self.refused = {f"node-{n}": reason for n, reason in result.errors.items()}
            self.refused.update({f"node-{n}": "no reply within the round timeout" for n in result.dropped})
        self.node_of_site.update(result.node_of_site)
        site_of = {node: site for site, node in self.node_of_site.items()}
        self.failures = {site_of.get(n, f"node-{n}"): reason for n, reason in result.errors.items()}
        self.failures.update({site_of.get(n, f"node-{n}"): "no reply within the round timeout" for n in result.dropped})
        self.errors.update(result.errors)
        self.last = result
        self.actions.append(action)
        self.seconds[action] = self.seconds.get(action, 0.0) + time.perf_counter() - start
        return result.replies
