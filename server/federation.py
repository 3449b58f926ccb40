"""Talking to the sites through a Flower Grid: wait for them, query them, collect valid replies."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from client.app import STUDY_KEY
from client.records import decode, encode
from common.config import StudyConfig
from common.errors import FedBiopsyError

log = logging.getLogger("fedbiopsy.server")
Payload = dict[str, object]


class NotEnoughSitesError(FedBiopsyError):
    """Fewer sites answered than the study's minimum."""


@dataclass
class QueryResult:
    """Valid replies by site id, and the refusals/errors by node."""

    replies: dict[str, Payload] = field(default_factory=dict)
    node_of_site: dict[str, int] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


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
        messages.append(Message(encode(body), dst_node_id=node, message_type=f"query.{action}"))
    result = QueryResult()
    for reply in grid.send_and_receive(messages, timeout=study.round_timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            result.errors[node] = reply.error.reason
            log.warning("query.%s: node %s answered an error: %s", action, node, reply.error.reason)
            continue
        content = decode(reply.content)
        site_id = str(content.pop("site_id", f"node-{node}"))
        result.replies[site_id] = content
        result.node_of_site[site_id] = node
    need = study.min_sites if minimum is None else minimum
    if len(result.replies) < need:
        reasons = "; ".join(result.errors.values()) or "no reply within the round timeout"
        raise NotEnoughSitesError(
            f"query.{action}: {len(result.replies)} valid repl(ies), the study needs {need} ({reasons})"
        )
    return result
