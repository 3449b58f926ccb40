"""A multi-round query over a fixed cohort of sites: whoever answers the first round must answer every later one.

Protocols whose server step sums the sites' replies across rounds (ComBat, feature reduction) use it as the
``query`` of their driver: a site that refuses the first round is left out (and reported); a site that fails
later stops the phase, since a partial sum would be silently wrong.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from server.federation import query_sites
from server.phases.base import PhaseContext

Payload = dict[str, object]


class CohortQuery:
    """``query(action, payload) -> {site_id: reply}`` over the sites that answered the first round."""

    def __init__(self, ctx: PhaseContext) -> None:
        self.ctx = ctx
        self.nodes: list[int] | None = None
        self.refused: dict[str, str] = {}
        self.actions: list[str] = []
        self.seconds: dict[str, float] = {}  # wall time of each round (send, site steps, receive)

    def __call__(self, action: str, payload: Mapping[str, object]) -> dict[str, Payload]:
        first = self.nodes is None
        start = time.perf_counter()
        result = query_sites(self.ctx.grid, action, self.ctx.study, payload,
                             node_ids=self.ctx.node_ids if first else self.nodes,
                             minimum=None if first else len(self.nodes or []))
        if first:
            self.nodes = [result.node_of_site[s] for s in sorted(result.replies)]
            self.refused = {f"node-{n}": reason for n, reason in result.errors.items()}
            self.refused.update({f"node-{n}": "no reply within the round timeout" for n in result.dropped})
        self.actions.append(action)
        self.seconds[action] = self.seconds.get(action, 0.0) + time.perf_counter() - start
        return result.replies
