"""The roll call: a deployment check of TLS, node authentication, site policy and rejoining, without images.

One action, ``rollcall``, asked ``rounds`` times: each site answers with its case count (an aggregate), the
round it answers and the hash of the app it runs. Each round goes to the sites connected *at that round*
(``new_query`` makes its query), so a site that dropped out and came back is asked again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from common.protocol import Payload, Query

ROLLCALL = "rollcall"
OnRound = Callable[[int, Query, dict[str, Payload], float], None]
"""``on_round(round, query, replies, seconds)``: called as each round completes."""


def run_rollcall(new_query: Callable[[], Query], rounds: int, on_round: OnRound, pause_s: float = 0.0) -> None:
    """Drive ``rounds`` roll-call rounds, ``pause_s`` apart, each through a fresh query from ``new_query``."""
    for rnd in range(1, rounds + 1):
        query = new_query()
        start = time.monotonic()
        replies = query(ROLLCALL, {"round": rnd})
        on_round(rnd, query, replies, time.monotonic() - start)
        if rnd < rounds and pause_s:
            time.sleep(pause_s)
