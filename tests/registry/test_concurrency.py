"""Two processes writing one registry at once: no event lost, no fork, one creation, one study record."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from server.registry import open_registry

N = 40
WRITER = """
import sys, time
from pathlib import Path
from common.config import StudyConfig
from server.registry import open_registry
folder, name, go, n = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
while not go.exists():
    time.sleep(0.005)
with open_registry(folder) as reg:
    reg.start_run(StudyConfig(name="shared"), None)
    for i in range(n):
        reg.append_event("test.append", f"writer:{name}", {"writer": name, "i": i})
        time.sleep(0.01)  # some work between events, as a server does (SQLite's lock is not fair to a waiter)
"""


def test_two_processes_append_concurrently_without_loss(tmp_path: Path) -> None:
    folder, go = tmp_path / "registry", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), name, str(go), str(N)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    time.sleep(1.0)  # both interpreters up and waiting
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err

    with open_registry(folder, create=False) as reg:
        report = reg.verify()
        events = reg.events()
    assert report.ok, report.broken
    kinds = [e.kind for e in events]
    assert kinds.count("registry.created") == 1 and kinds[0] == "registry.created"  # created once, first
    assert kinds.count("study.recorded") == 1 and kinds.count("run.started") == 2
    assert len(events) == 1 + 1 + 2 + 2 * N and [e.seq for e in events] == list(range(1, len(events) + 1))
    seqs = {}
    for name in ("a", "b"):
        mine = [e for e in events if e.kind == "test.append" and e.payload["writer"] == name]
        assert [e.payload["i"] for e in mine] == list(range(N))  # every event, in the writer's order
        seqs[name] = (mine[0].seq, mine[-1].seq)
    # the two writers really overlapped in time (their events interleave in the log)
    assert seqs["a"][0] < seqs["b"][1] and seqs["b"][0] < seqs["a"][1], seqs
