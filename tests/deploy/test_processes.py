"""Stopping a federation's processes: whole trees, children in their own sessions, and orphans."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from deploy.processes import Processes, alive, descendants

# a parent that starts a child in a new session (as Flower starts flower-superexec / flwr-clientapp)
SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(float(sys.argv[1]))
"""


def _child_pid(log: Path, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text().strip() if log.is_file() else ""
        if text:
            return int(text.split()[0])
        time.sleep(0.05)
    raise AssertionError(f"no child pid in {log}")


def test_stop_kills_the_tree_across_sessions(tmp_path: Path) -> None:
    with Processes(tmp_path) as procs:
        parent = procs.start("parent", [sys.executable, "-c", SPAWNER, "300"], os.environ)
        child = _child_pid(parent.log_path)
        assert child in descendants(parent.pid)
        assert os.getsid(child) != os.getsid(parent.pid)  # not reachable through the parent's session
        assert set(procs.tagged_pids()) >= {parent.pid, child}
        procs.stop("parent", grace_s=5)
        assert not alive(parent.pid) and not alive(child)


def test_stop_all_finds_orphans_by_tag(tmp_path: Path) -> None:
    procs = Processes(tmp_path)
    try:
        parent = procs.start("parent", [sys.executable, "-c", SPAWNER, "0"], os.environ)
        child = _child_pid(parent.log_path)
        parent.popen.wait(timeout=30)  # the parent exits: its child is re-parented, no longer a descendant
        assert alive(child) and child not in descendants(parent.pid)
    finally:
        procs.stop_all(grace_s=5)
    assert not alive(child)
    assert procs.tagged_pids() == []
