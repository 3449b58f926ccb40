"""Talking to the sites through a Flower Grid: wait for them, query them, collect valid replies."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from client.app import STUDY_KEY
from client.records import decode, encode
from common.config import StudyConfig
from common.errors import FedBiopsyError

log = logging.getLogger("fedbiopsy.server")
_UNAVAILABLE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
Payload = dict[str, object]


class NotEnoughSitesError(FedBiopsyError):
    """Fewer sites answered than the study's minimum."""


@dataclass
class QueryResult:
    """Valid replies by site id, the refusals/errors by node, and the nodes that did not answer in time."""

    replies: dict[str, Payload] = field(default_factory=dict)
    node_of_site: dict[str, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float = 120.0) -> list[int]:
    """The connected node ids, once at least ``minimum`` are there (raises after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= minimum:
            return ids
        if time.monotonic() > deadline:
            raise NotEnoughSitesError(f"only {len(ids)} site(s) connected after {timeout_s:.0f}s; need {minimum}")
        time.sleep(0.25)


def query_sites(grid: Grid, action: str, study: StudyConfig, payload: Mapping[str, object] | None = None,
                node_ids: list[int] | None = None, per_node: Mapping[int, Mapping[str, object]] | None = None,
                minimum: int | None = None) -> QueryResult:
    """Send ``query.<action>`` to every node and collect the replies.

    ``payload`` goes to every node, ``per_node`` adds node-specific entries. Error replies are logged
    with the site's reason; fewer valid replies than ``minimum`` (default: the study's) raise.
    """
    ids = node_ids if node_ids is not None else wait_for_nodes(grid, study.min_sites)
    study_json = json.dumps(study.model_dump(mode="json"))
    messages = []
    for node in ids:
        body = dict(payload or {})
        body.update((per_node or {}).get(node, {}))
        body[STUDY_KEY] = study_json
        # the query expires with the round: a site that comes back later does not compute for nothing
        messages.append(Message(encode(body), dst_node_id=node, message_type=f"query.{action}",
                                ttl=study.round_timeout_s))
    result = QueryResult()
    replies = list(grid.send_and_receive(messages, timeout=study.round_timeout_s))
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    lost: set[int] = set()
    for reply in replies:
        # the SuperLink answers for a node it lost (crashed, lease expired): map the reply to its query
        node = dst_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error() and reply.error.code in _UNAVAILABLE:
            lost.add(node)
            continue
        if reply.has_error():
            result.errors[node] = reply.error.reason
            log.warning("query.%s: node %s answered an error: %s", action, node, reply.error.reason)
            continue
        content = decode(reply.content)
        site_id = str(content.pop("site_id", f"node-{node}"))
        result.replies[site_id] = content
        result.node_of_site[site_id] = node
    result.dropped = [n for n in ids if n not in result.errors and n not in result.node_of_site.values()]
    if result.dropped:
        log.warning("query.%s: node(s) %s dropped out (lost by the SuperLink: %s; no reply within %.0fs: %s)",
                    action, result.dropped, sorted(lost), study.round_timeout_s, sorted(set(result.dropped) - lost))
    need = study.min_sites if minimum is None else minimum
    if len(result.replies) < need:
        reasons = "; ".join(result.errors.values()) or "no reply within the round timeout"
        raise NotEnoughSitesError(
            f"query.{action}: {len(result.replies)} valid repl(ies), the study needs {need} ({reasons})"
        )
    return result
