"""A message pick-up for Flower's simulation engine whose cost does not grow with nodes x messages.

Flower 1.42's ``vce_api.add_messages_to_queue`` asks the in-memory LinkState, every 0.1 s, for one message
for *each* virtual node, and each ask scans *every* stored message (``InMemoryLinkState.get_message_ins``).
A pass therefore costs nodes x messages checks, ten times a second for the whole of every round: with 100
sites about 10^4 checks per pass, which measured about 9 s of the driver's CPU in one run of the statistics
phases (simulations/bench_scale.py), taken from the ClientApps on a 2-core machine; the cost grows with the
square of the number of sites.

:func:`indexed_message_polling` replaces that loop, for the duration of a simulation, by one that scans the
store once per pass and asks, with Flower's own ``get_message_ins`` (so the delivery and expiry rules stay
Flower's), only for the nodes that have an undelivered message. Where the installed Flower differs from
what this was written against, Flower's own loop is kept.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
_EXPECTED = ["state", "queue", "nodes_mapping", "f_stop"]


@contextmanager
def indexed_message_polling() -> Iterator[bool]:
    """Within the block, the simulation engine picks messages up per waiting node; yields whether it does."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    if list(inspect.signature(original).parameters) != _EXPECTED:
        log.warning("flwr's add_messages_to_queue has changed; keeping Flower's per-node polling")
        yield False
        return

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:  # noqa: ANN001 - Flower's signature
        if not (hasattr(state, "message_ins_store") and hasattr(state, "lock")):
            return original(state, queue, nodes_mapping, f_stop)
        nodes = set(nodes_mapping)
        while not f_stop.is_set():
            with state.lock:
                waiting = {m.metadata.dst_node_id for m in state.message_ins_store.values()
                           if m.metadata.delivered_at == ""}
            for node_id in sorted(waiting & nodes):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(0.1)
        return None

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
