"""``flower-supernode`` with the site's own idle poll interval.

Flower 1.42's SuperNode asks the SuperLink for a message and, when there is none, sleeps a fixed 3 s
(``supernode/start_client_internal.py``): every round of a study waits on average half of that, at every site,
before the site even sees its message, and a study has dozens of rounds. This runs Flower's own SuperNode
command unchanged except for that one idle sleep, which becomes ``FEDBIOPSY_SUPERNODE_POLL_S`` seconds
(default 3, Flower's). A shorter interval costs the SuperLink one more small request per site per interval:
fine for a few hospitals; keep Flower's 3 s for hundreds. Where the installed Flower differs from what this was
written against, Flower's SuperNode runs as it is.

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


class _IdlePoll:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: ``sleep(3)`` sleeps ``interval_s``."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s

    def sleep(self, seconds: float) -> None:
        time.sleep(self.interval_s if seconds == 3 else seconds)

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

    interval = float(os.environ.get(POLL_VARIABLE, "3"))
    if not 0.05 <= interval <= 60:
        raise SystemExit(f"{POLL_VARIABLE}={interval}: use between 0.05 and 60 seconds")
    if interval != 3:
        set_idle_poll(start_client_internal, interval)
    flower_supernode()


if __name__ == "__main__":
    main()
