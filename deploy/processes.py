"""Processes this machine started for a federation, and how to stop them all (Linux ``/proc``).

Every Flower process is started in its own session (``start_new_session``), and Flower itself starts
children in sessions of their own (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``). Stopping
by the root's process group alone would leave those behind, so :meth:`Processes.stop` first freezes the
root and all its descendants (``SIGSTOP``: nothing can spawn or re-parent while frozen), then signals every
one of them by pid, and escalates to ``SIGKILL`` after a grace period. Every process also inherits a tag
in its environment (``FEDBIOPSY_PROCESS_TAG``), so that :meth:`Processes.stop_all` finds and stops even a
child whose parent died first (re-parented to init).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)
TAG_VARIABLE = "FEDBIOPSY_PROCESS_TAG"


def flower_command(name: str) -> str:
    """Path of a Flower console script (``flwr``, ``flower-superlink``, ...), preferring this environment's."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"`{name}` not found: install flwr (pip install 'flwr[simulation]==1.42.0')")
    return found


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None when it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (children first, breadth-first)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    return _stat(pid) is not None


def _signal(pid: int, sig: int, started: int | None = None) -> None:
    st = _stat(pid)
    if st is None or (started is not None and st[1] != started):
        return  # gone, or the pid was reused by another process
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _any_alive(tree: Sequence[tuple[int, int]]) -> bool:
    return any((st := _stat(pid)) is not None and st[1] == started for pid, started in tree)


@dataclass
class Managed:
    """One process started by :class:`Processes`, with its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    cmd: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


class Processes:
    """The processes of one local federation; a context manager that stops all of them on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.managed: dict[str, Managed] = {}
        self.tag = uuid.uuid4().hex

    def tagged_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` plus this group's tag, for any process started on its behalf."""
        return {**env, TAG_VARIABLE: self.tag}

    def tagged_pids(self) -> list[int]:
        """Live pids whose environment holds this group's tag (every process it started, and their children)."""
        marker = f"{TAG_VARIABLE}={self.tag}".encode()
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    environ = Path(f"/proc/{entry}/environ").read_bytes()
                except OSError:
                    continue
                if marker in environ.split(b"\0") and alive(int(entry)):
                    out.append(int(entry))
        return out

    def start(self, name: str, cmd: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> Managed:
        """Start ``cmd`` in a new session, output appended to ``<log_dir>/<name>.log``."""
        if name in self.managed and self.managed[name].running():
            raise RuntimeError(f"process {name!r} is already running (pid {self.managed[name].pid})")
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as out:
            popen = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.tagged_env(env), cwd=cwd, start_new_session=True)
        self.managed[name] = Managed(name, popen, log_path, list(cmd))
        log.debug("started %s (pid %d): %s", name, popen.pid, " ".join(cmd))
        return self.managed[name]

    def stop(self, name: str, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        """Stop a process and every descendant: ``sig`` first, ``SIGKILL`` after ``grace_s``."""
        proc = self.managed.get(name)
        if proc is None:
            return
        root = proc.pid
        tree = self._freeze(root)
        for pid, started in tree:
            _signal(pid, sig, started)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, sig)  # anything left in the root's own process group
        for pid, started in tree:
            _signal(pid, signal.SIGCONT, started)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _any_alive(tree):
            proc.popen.poll()
            time.sleep(0.05)
        for pid, started in tree:
            _signal(pid, signal.SIGKILL, started)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)
        log.debug("stopped %s (pid %d) and %d descendant(s)", name, root, len(tree) - 1)

    def kill(self, name: str) -> None:
        """``SIGKILL`` a process and its descendants at once (a crash, for fault tests)."""
        self.stop(name, sig=signal.SIGKILL, grace_s=0.0)

    def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop every process started here, the last started first, then any tagged straggler."""
        for name in reversed(list(self.managed)):
            try:
                self.stop(name, grace_s=grace_s)
            except Exception:  # noqa: BLE001 - keep stopping the others
                log.exception("could not stop %s", name)
        stragglers = [(pid, st[1]) for pid in self.tagged_pids() if (st := _stat(pid)) is not None]
        for pid, started in stragglers:
            _signal(pid, signal.SIGTERM, started)
        deadline = time.monotonic() + grace_s
        while stragglers and time.monotonic() < deadline and _any_alive(stragglers):
            time.sleep(0.05)
        for pid, started in stragglers:
            _signal(pid, signal.SIGKILL, started)
        if stragglers:
            log.debug("stopped %d re-parented process(es): %s", len(stragglers), [p for p, _ in stragglers])

    def pids(self) -> list[int]:
        """Live pids of every managed process and its descendants."""
        out: list[int] = []
        for proc in self.managed.values():
            if alive(proc.pid):
                out += [proc.pid, *descendants(proc.pid)]
        return out

    @staticmethod
    def _freeze(root: int) -> list[tuple[int, int]]:
        """SIGSTOP ``root`` and its descendants until no new one appears; (pid, start time) of all of them."""
        frozen: dict[int, int] = {}
        for _ in range(20):
            pids = [root, *descendants(root)]
            new = [p for p in pids if p not in frozen]
            if not new:
                break
            for pid in new:
                st = _stat(pid)
                if st is not None:
                    frozen[pid] = st[1]
                    _signal(pid, signal.SIGSTOP, st[1])
        return list(frozen.items())

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()
