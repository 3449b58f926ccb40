"""Server step of the roll call (:func:`common.rollcall.run_rollcall`): ``study.rollcall.rounds`` rounds.

Each round asks the nodes connected *at that round* (so a site that dropped out and came back is asked
again), completes with the sites that answered within ``study.round_timeout_s`` as long as at least
``study.min_sites`` did, and records who answered, who refused (with the rule) and who dropped out.
Rounds are also appended to ``<result_dir>/rollcall-rounds.jsonl`` as they finish.
"""

from __future__ import annotations

import json
import logging
from typing import cast

from common.protocol import Payload, Query
from common.rollcall import run_rollcall
from server.federation import FlowerQuery
from server.phases.base import PhaseContext

log = logging.getLogger(__name__)
ROUNDS_FILE = "rollcall-rounds.jsonl"


def run(ctx: PhaseContext) -> dict:
    """Every round's answering, refusing and dropped sites; participants are the sites of the last round."""
    cfg = ctx.study.rollcall
    rounds: list[dict] = []
    progress = ctx.result_dir / ROUNDS_FILE

    def record_round(rnd: int, query: Query, replies: dict[str, Payload], seconds: float) -> None:
        result = cast(FlowerQuery, query).last
        sites = {s: {"node": str(result.node_of_site[s]), "n_cases": int(str(r["n_cases"])),
                     "app_hash": str(r.get("app_hash", ""))} for s, r in sorted(replies.items())}
        record = {"round": rnd, "seconds": round(seconds, 3), "sites": sites,
                  "refused": {str(n): reason for n, reason in result.errors.items()},
                  "dropped": [str(n) for n in result.dropped]}
        rounds.append(record)
        with progress.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        log.info("rollcall round %d/%d: %d site(s) answered in %.1fs (%s), %d refused, %d dropped", rnd, cfg.rounds,
                 len(sites), seconds, ", ".join(sites), len(result.errors), len(result.dropped))

    run_rollcall(lambda: ctx.query(ctx.federation.connected()), cfg.rounds, record_round, cfg.pause_s)
    last = rounds[-1]["sites"]
    ctx.participants["rollcall"] = {s: v["n_cases"] for s, v in last.items()}
    return {
        "rounds": rounds,
        "dropped": sorted({n for r in rounds for n in r["dropped"]}),
        "refused": {n: reason for r in rounds for n, reason in r["refused"].items()},
    }
