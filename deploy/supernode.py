"""``flower-supernode`` with the site's own waits: the idle poll interval and the object-pull backoff.

Flower 1.42's SuperNode (``supernode/start_client_internal.py``) makes every round of a study wait, at every
site, on three fixed pauses that have nothing to do with the work:

* when the SuperLink has no message it sleeps 3 s before asking again;
* it waits for the local reply, and for each of its objects, in steps of 0.5 s;
* a message's objects that are not uploaded yet (the ServerApp pushes a message before its contents) are
  retried after 1 s, then 2, 4, ... up to 10 s (``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP``), and the same
  backoff applies when the site's ClientApp pulls the message from the SuperNode.

Measured on a 2-site rehearsal these pauses, not the sites' work, were most of a round. This runs Flower's own
SuperNode command unchanged except for them: the idle poll becomes ``FEDBIOPSY_SUPERNODE_POLL_S`` seconds
(default 3, Flower's), the local waits 0.1 s, and object pulls retry after 50 ms doubling up to 1 s. A shorter
idle poll costs the SuperLink one more small request per site per interval: fine for a few hospitals; keep
Flower's 3 s for hundreds. Where the installed Flower differs from what this was written against, Flower's
SuperNode runs as it is.

    FEDBIOPSY_SUPERNODE_POLL_S=0.5 python -m deploy.supernode --superlink ... (flower-supernode's arguments)
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)
POLL_VARIABLE = "FEDBIOPSY_SUPERNODE_POLL_S"
_IDLE_SLEEP = "time.sleep(3)"


LOCAL_WAIT_S = 0.1


class _IdlePoll:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: ``sleep(3)`` (no message) sleeps
    ``interval_s``, ``sleep(0.5)`` (waiting for the local reply) :data:`LOCAL_WAIT_S`."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s

    def sleep(self, seconds: float) -> None:
        time.sleep(self.interval_s if seconds == 3 else LOCAL_WAIT_S if seconds == 0.5 else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def set_idle_poll(module: ModuleType, interval_s: float) -> bool:
    """Make the SuperNode loop of ``module`` poll every ``interval_s`` when idle; False if it is not Flower's."""
    source = inspect.getsource(module.start_client_internal)
    if source.count(_IDLE_SLEEP) != 1 or getattr(module, "time", None) is not time:
        log.warning("flwr's SuperNode loop has changed; keeping its own idle poll")
        return False
    module.time = _IdlePoll(interval_s)  # type: ignore[attr-defined]
    return True


def main() -> None:
    """Run ``flower-supernode`` (same arguments) with the idle poll of ``FEDBIOPSY_SUPERNODE_POLL_S``."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from server.federation import set_pull_backoff

    interval = float(os.environ.get(POLL_VARIABLE, "3"))
    if not 0.05 <= interval <= 60:
        raise SystemExit(f"{POLL_VARIABLE}={interval}: use between 0.05 and 60 seconds")
    set_idle_poll(start_client_internal, interval)
    set_pull_backoff()
    flower_supernode()


if __name__ == "__main__":
    main()
