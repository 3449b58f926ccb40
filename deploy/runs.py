"""Studies on a running local federation: submitted with ``flwr run --stream``, followed to their end.

:func:`run_study` streams the run's log (re-attaching with ``flwr log --stream`` when the SuperLink comes back
after a restart) and returns a :class:`RunOutcome`; :func:`run_status` and :func:`stop_run` ask the SuperLink
with ``flwr ls`` / ``flwr stop``. The federation (:class:`deploy.local.LocalFederation`) offers them as methods.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.processes import flower_command
from deploy.supervision import CONNECTION, DeploymentError

if TYPE_CHECKING:
    from deploy.local import LocalFederation

log = logging.getLogger(__name__)
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_STREAM_START = re.compile(r"Starting logstream for run_id")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class RunOutcome:
    """What a submitted study gave: its run id, final status, result folder and streamed log lines."""

    run_id: int | None
    status: str
    result_dir: Path
    log_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reattached: int = 0  # times the log stream was re-attached after the SuperLink came back

    @property
    def completed(self) -> bool:
        """Whether the run finished as completed and wrote its ``study.json``."""
        return self.status == "finished:completed" and (self.result_dir / "study.json").is_file()

    def summary(self) -> dict:
        """``study.json`` of the run (raises when the run wrote none)."""
        path = self.result_dir / "study.json"
        if not path.is_file():
            raise DeploymentError(f"run {self.run_id} ({self.status}) wrote no {path}")
        return json.loads(path.read_text())


def run_study(fed: LocalFederation, study_path: Path, result_dir: Path, timeout_s: float = 1800.0,
              on_line: Callable[[str], None] | None = None, extra_config: dict[str, object] | None = None,
              restart_grace_s: float = 120.0) -> RunOutcome:
    """Submit the study with ``flwr run --stream`` and follow its log until the run ends.

    The run config passes ``study-config`` and ``result-dir`` (absolute paths: the ServerApp runs on
    this machine). When the log stream breaks because the SuperLink went away, this waits up to
    ``restart_grace_s`` for it to come back and re-attaches (``flwr log --stream``): with the SuperExec
    separate from the SuperLink the ServerApp survives a SuperLink restart and the study resumes. The
    returned status is Flower's (``finished:completed``, ``finished:failed``, ...) or one of
    ``superlink lost``, ``interrupted`` (the ServerApp died with the SuperLink), ``timed out``.
    """
    if fed.app_dir is None:
        raise DeploymentError("the federation is not started")
    result_dir = Path(result_dir).resolve()
    config: dict[str, object] = {"study-config": str(Path(study_path).resolve()), "result-dir": str(result_dir)}
    if fed.nodes:  # each site counts only from its node (the one its registered key authenticates)
        config["site-nodes"] = ",".join(f"{n.name}:{n.node_id}" for n in fed.nodes.values() if n.node_id is not None)
    config.update(extra_config or {})
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    cmd = [flower_command("flwr"), "run", str(fed.app_dir), CONNECTION, "--run-config", run_config, "--stream"]
    outcome = RunOutcome(None, "not started", result_dir)
    start = time.monotonic()
    deadline = start + timeout_s
    streamed: list[str] = []  # the run's log lines shown so far (a re-attached stream replays them)
    superlink_pid = fed.superlink_pid()
    while True:
        _follow(fed, cmd, outcome, streamed, deadline, on_line or _log_line)
        if outcome.run_id is None:
            break
        if time.monotonic() > deadline:
            outcome.status = "timed out"
            stop_run(fed, outcome.run_id)
            break
        if not fed.wait_superlink(min(restart_grace_s, max(0.0, deadline - time.monotonic()))):
            outcome.status = "superlink lost"
            break
        if fed.superlink_pid() != superlink_pid and not fed.separate_superexec:
            outcome.status = "interrupted"
            stop_run(fed, outcome.run_id)
            break
        outcome.status = run_status(fed, outcome.run_id, wait_s=5.0)
        if outcome.status.startswith("finished"):
            break
        log.warning("the log stream of run %s ended while the run is %s (SuperLink restart?); re-attaching",
                    outcome.run_id, outcome.status)
        outcome.reattached += 1
        cmd = [flower_command("flwr"), "log", str(outcome.run_id), CONNECTION, "--stream"]
    outcome.seconds = time.monotonic() - start
    return outcome


def _follow(fed: LocalFederation, cmd: list[str], outcome: RunOutcome, streamed: list[str], deadline: float,
            on_line: Callable[[str], None]) -> None:
    """Run a streaming ``flwr`` command until it ends, the SuperLink is gone or the deadline passes."""
    lines: queue.Queue[str | None] = queue.Queue()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=fed.cli_env(), cwd=fed.cli_home, text=True, errors="replace",
                            start_new_session=True)
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    in_stream = False
    replayed = 0
    first = not streamed
    lost_at: float | None = None
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                return
            if line and _STREAM_START.search(line):
                in_stream = True
            if line and not in_stream:
                if outcome.run_id is None and (m := _RUN_ID.search(line)):
                    outcome.run_id = int(m.group(1))
                if first:
                    outcome.log_lines.append(line)
                    on_line(line)
            elif line and not _STREAM_START.search(line):
                if replayed < len(streamed) and streamed[replayed] == line:
                    replayed += 1  # already shown before the stream broke
                    continue
                streamed.append(line)
                replayed = len(streamed)
                outcome.log_lines.append(line)
                on_line(line)
            if fed.superlink_running():
                lost_at = None
            elif time.monotonic() - (lost_at := lost_at or time.monotonic()) > 5.0:
                return
    finally:
        _stop_popen(proc)
        reader.join(timeout=5)


def run_status(fed: LocalFederation, run_id: int | None, wait_s: float = 20.0) -> str:
    """A run's status as ``flwr ls`` reports it (e.g. ``finished:completed``), once it has finished."""
    if run_id is None:
        return "not started"
    deadline = time.monotonic() + wait_s
    status = "unknown"
    while True:
        proc = subprocess.run([flower_command("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format",
                               "json"], env=fed.cli_env(), cwd=fed.cli_home, capture_output=True,
                              text=True, timeout=60, check=False)
        try:
            runs = json.loads(proc.stdout[proc.stdout.find("{"):]).get("runs", [])
            status = str(runs[0]["status"]) if runs else "unknown"
        except (json.JSONDecodeError, KeyError, IndexError):
            status = "unknown"
        if status.startswith("finished") or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def stop_run(fed: LocalFederation, run_id: int) -> None:
    """Ask the SuperLink to stop a run (``flwr stop``)."""
    subprocess.run([flower_command("flwr"), "stop", str(run_id), CONNECTION], env=fed.cli_env(),
                   cwd=fed.cli_home, capture_output=True, text=True, timeout=60, check=False)


def _pump(stream: object, out: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        out.put(line.rstrip("\n"))
    out.put(None)


def _stop_popen(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _log_line(line: str) -> None:
    log.info("%s", _ANSI.sub("", line))
