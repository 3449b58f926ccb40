"""Watching the processes of a local federation come up: loopback ports, log lines since a start, the environment.

Every Flower process of :class:`deploy.local.LocalFederation` writes its log to ``<logs>/<name>.log``
(:class:`deploy.processes.Processes`); a process is *up* when its log shows a line it prints once ready
(the SuperLink's ``Uvicorn running on``, a SuperNode's ``SuperNode ID``). :func:`wait_for` waits for that,
and raises :class:`DeploymentError` with the end of the log when the process exits or times out first.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import FedBiopsyError
from deploy.processes import Processes

CONNECTION = "fedbiopsy"  # the flwr CLI's connection to the local SuperLink (in <work>/cli/config.toml)


class DeploymentError(FedBiopsyError):
    """The local federation could not start, or a run on it did not finish."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def base_env() -> dict[str, str]:
    """Environment of every Flower process: telemetry, update checks and runtime installs off."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    return env


def log_size(processes: Processes, proc_name: str) -> int:
    """The current size of a process's log (0 before its first start): where its next start's lines begin."""
    path = processes.log_dir / f"{proc_name}.log"
    return path.stat().st_size if path.is_file() else 0


def log_since(processes: Processes, proc_name: str, offset: int) -> str:
    """What a process has logged since ``offset`` (see :func:`log_size`)."""
    path = processes.log_dir / f"{proc_name}.log"
    if not path.is_file():
        return ""
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def wait_for(processes: Processes, ready: Callable[[], bool], proc_name: str, what: str, timeout_s: float) -> None:
    """Poll ``ready`` until it holds; raises :class:`DeploymentError` if the process exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    proc = processes.managed[proc_name]
    while not ready():
        if not proc.running():
            raise DeploymentError(f"waiting for {what}: the process exited with code {proc.popen.returncode}; "
                                  f"its log ({proc.log_path}) ends with:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"waiting for {what}: nothing after {timeout_s:.0f}s;"
                                  f" its log ({proc.log_path}) ends with:\n{proc.log_tail()}")
        time.sleep(0.1)
