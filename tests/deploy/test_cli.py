"""``fedbiopsy deploy local`` on Ctrl-C: every process it started is stopped (here without TLS: --insecure)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _processes_under(folder: Path) -> list[int]:
    """Pids of live processes whose environment points into ``folder`` (every process the command started)."""
    marker = str(folder).encode()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in environ and state != "Z":
                out.append(int(entry))
    return out


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    # Prepare: a study long enough to be interrupted in its middle
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "ctrl-c", "phases": ["rollcall"], "min_sites": 2,
                                     "rollcall": {"rounds": 20, "pause_s": 5},
                                     "simulation": {"sites": 2, "patients": 6, "size": 16}}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cli.main", "deploy", "local", "--sites", "2", "--insecure", "--config", str(study),
           "--out", str(out)]
    # Ctrl-C as in a terminal: a test run started in the background (`make test &`) inherits an ignored SIGINT
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 200
        while not any("phase rollcall: start" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "the study did not start:\n" + "".join(lines)
            time.sleep(0.2)
        running = _processes_under(out)
        assert len(running) >= 5  # SuperLink, SuperExec, ServerApp, 2 SuperNodes (+ their SuperExecs)

        # Execute: Ctrl-C
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Assert: exit status 130, nothing left running, and the log says so
    assert code == 130, "".join(lines[-30:])
    assert _processes_under(out) == []
    assert "interrupted" in "".join(lines[-5:])
    assert "INSECURE" in "".join(lines)
