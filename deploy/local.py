"""A real Flower federation on this machine: one ``flower-superlink`` and one ``flower-supernode`` per site.

Everything listens on 127.0.0.1 on free ports; each process has its own ``FLWR_HOME`` (as each hospital
would), telemetry and update checks are off and runtime dependency installation is disabled (the app runs
in this environment, as on an offline hospital machine). With TLS (the default) the SuperLink serves a
certificate signed by a fresh study CA and authenticates SuperNodes: each site's EC P-384 public key is
registered with ``flwr supernode register`` before its SuperNode starts. A study is submitted with
``flwr run`` and its log streamed; every process started here is stopped (by pid, with its descendants)
when the federation is closed, on error or on Ctrl-C.

    with LocalFederation(site_dirs, work_dir) as fed:
        outcome = fed.run_study(study_yaml, result_dir)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from common.errors import ConfigError, FedBiopsyError
from common.sitedata import load_site_config
from deploy.app import REPO_ROOT, stage_app
from deploy.certificates import StudyPki, create_node_keys, create_study_pki, flwr_env, register_node
from deploy.processes import Processes, flower_command

log = logging.getLogger(__name__)
CONNECTION = "fedbiopsy"
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_STREAM_START = re.compile(r"Starting logstream for run_id")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")


class DeploymentError(FedBiopsyError):
    """The local federation could not start, or a run on it did not finish."""


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
        return self.status == "finished:completed" and (self.result_dir / "study.json").is_file()

    def summary(self) -> dict:
        """``study.json`` of the run (raises when the run wrote none)."""
        path = self.result_dir / "study.json"
        if not path.is_file():
            raise DeploymentError(f"run {self.run_id} ({self.status}) wrote no {path}")
        return json.loads(path.read_text())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def base_env() -> dict[str, str]:
    """Environment of every Flower process: telemetry, update checks and runtime installs off."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    return env


@dataclass
class SiteNode:
    """One hospital of the local federation: its data folder, key pair and SuperNode state."""

    name: str
    data_path: Path
    home: Path
    port: int
    private_key: Path | None = None
    public_key: Path | None = None
    node_id: int | None = None


class LocalFederation:
    """A SuperLink and one SuperNode per site directory, on loopback; a context manager.

    ``tls=False`` runs everything with ``--insecure`` and without node authentication (never for real
    data). ``auth`` (default: same as ``tls``) turns on SuperNode authentication. The SuperLink keeps its
    state in ``<work>/superlink/state.db``; with ``separate_superexec`` (default, as in the templates) the
    ServerApps run under a ``flower-superexec`` of their own (SuperLink ``--isolation process``), so a study
    survives a SuperLink restart; otherwise under the SuperLink's built-in one (Flower's default).
    """

    def __init__(self, site_dirs: Sequence[Path], work_dir: Path, tls: bool = True, auth: bool | None = None,
                 app_dir: Path = REPO_ROOT, startup_timeout_s: float = 90.0, separate_superexec: bool = True) -> None:
        if not site_dirs:
            raise ConfigError("--sites", "no site directory given", "pass at least one simulated or real site")
        self.tls = tls
        self.auth = tls if auth is None else auth
        if self.auth and not self.tls:
            raise ConfigError("--insecure", "node authentication needs TLS", "drop --insecure or --auth")
        self.work = Path(work_dir).resolve()
        self.app_source = Path(app_dir)
        self.startup_timeout_s = startup_timeout_s
        self.separate_superexec = separate_superexec
        self.env = base_env()
        self.processes = Processes(self.work / "logs")
        self.superlink_home = self.work / "superlink"
        self.cli_home = self.work / "cli"
        self.database = self.superlink_home / "state.db"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.pki: StudyPki | None = None
        self.app_dir: Path | None = None
        self.nodes: dict[str, SiteNode] = {}
        self._offsets: dict[str, int] = {}  # log size at each SuperNode's last start
        for site_dir in site_dirs:
            node = self._site_node(Path(site_dir))
            self.nodes[node.name] = node

    def _site_node(self, site_dir: Path, name: str | None = None) -> SiteNode:
        site_dir = site_dir.resolve()
        if '"' in str(site_dir):
            raise ConfigError(site_dir, "a double quote in the path", "move the site to a plain path")
        name = name or load_site_config(site_dir).site_id
        if name in self.nodes:
            raise ConfigError(site_dir, f"site {name!r} is already in the federation", "give each site its own id")
        return SiteNode(name, site_dir, self.work / "nodes" / name, free_port())

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> LocalFederation:
        """Certificates, SuperLink, node registration, SuperNodes; returns once every node is connected.

        What an earlier local federation left in the work folder (keys, state database, Flower homes, logs)
        is removed first: a rehearsal always starts from a fresh CA and an empty SuperLink.
        """
        for sub in ("pki", "superlink", "cli", "nodes", "app", "logs"):
            shutil.rmtree(self.work / sub, ignore_errors=True)
        self.processes.log_dir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.pki = create_study_pki(self.work / "pki", sorted(self.nodes))
            for node in self.nodes.values():
                keys = self.pki.nodes[node.name]
                node.private_key, node.public_key = keys.private_key, keys.public_key
        self.app_dir = stage_app(self.work / "app", self.app_source)
        self._write_cli_config()
        self.start_superlink()
        if self.auth:
            for node in self.nodes.values():
                node.node_id = self.register(node.name)
        for name in self.nodes:
            self.start_node(name, wait=False)
        for name in self.nodes:
            self.wait_node(name)
        log.info("local federation up: SuperLink %s (%s), %d SuperNode(s): %s", self.address,
                 "TLS + node authentication" if self.auth else ("TLS" if self.tls else "INSECURE"), len(self.nodes),
                 ", ".join(f"{n.name}={n.node_id}" for n in self.nodes.values()))
        return self

    def close(self) -> None:
        """Stop every process this federation started (SuperNodes first, then the SuperLink)."""
        self.processes.stop_all()

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- SuperLink ---------------------------------------------------------------------------------------------
    def superlink_command(self) -> list[str]:
        """The ``flower-superlink`` command line of this federation."""
        cmd = [flower_command("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--database", str(self.database), "--disable-runtime-dependency-installation"]
        if self.tls and self.pki is not None:
            cmd += ["--ssl-certfile", str(self.pki.server_cert), "--ssl-keyfile", str(self.pki.server_key),
                    "--ssl-ca-certfile", str(self.pki.ca_cert)]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        if self.separate_superexec:
            cmd += ["--isolation", "process"]
        return cmd

    def superexec_command(self) -> list[str]:
        """The ``flower-superexec`` that runs ServerApps when it is separate from the SuperLink."""
        cmd = [flower_command("flower-superexec"), "--runtime-api-address", self.address]
        if self.tls and self.pki is not None:
            cmd += ["--root-certificates", str(self.pki.ca_cert)]
        else:
            cmd += ["--insecure"]
        return cmd

    def start_superlink(self) -> None:
        """Start the SuperLink (its state persists in ``superlink/state.db``) and wait until it serves."""
        self.superlink_home.mkdir(parents=True, exist_ok=True)
        offset = self._log_size("superlink")
        proc = self.processes.start("superlink", self.superlink_command(), self._env(self.superlink_home),
                                    cwd=self.superlink_home)
        self._wait_for(lambda: "Uvicorn running on" in self._log_since("superlink", offset) and self._port_open(),
                       "superlink", f"the SuperLink (pid {proc.pid}) to serve {self.address}")
        superexec = self.processes.managed.get("superexec")
        if self.separate_superexec and (superexec is None or not superexec.running()):
            self.processes.start("superexec", self.superexec_command(), self._env(self.superlink_home),
                                 cwd=self.superlink_home)

    def stop_superlink(self, crash: bool = False) -> None:
        """Stop the SuperLink and its descendants (``crash``: SIGKILL, no clean shutdown)."""
        (self.processes.kill if crash else self.processes.stop)("superlink")

    def restart_superlink(self, crash: bool = True) -> None:
        """Stop and start the SuperLink on the same port with the same state database."""
        self.stop_superlink(crash=crash)
        self.start_superlink()

    def superlink_running(self) -> bool:
        proc = self.processes.managed.get("superlink")
        return proc is not None and proc.running()

    # -- SuperNodes --------------------------------------------------------------------------------------------
    def register(self, name: str) -> int:
        """Register a site's public key at the SuperLink; returns its node id."""
        node = self.nodes[name]
        if node.public_key is None:
            raise DeploymentError(f"site {name!r} has no key pair (TLS off?)")
        return register_node(node.public_key, CONNECTION, self.cli_home, name=name)

    def add_site(self, site_dir: Path, name: str | None = None, register: bool = True) -> SiteNode:
        """A new hospital: its key pair (registered at the SuperLink unless ``register`` is False; an
        unregistered key must be refused) and its SuperNode's settings; start it with :meth:`start_node`."""
        node = self._site_node(Path(site_dir), name)
        self.nodes[node.name] = node
        name = node.name
        if self.tls:
            keys = create_node_keys(self.work / "pki" / ("nodes" if register else "unregistered"), name)
            node.private_key, node.public_key = keys.private_key, keys.public_key
            if register and self.auth:
                node.node_id = self.register(name)
        return node

    def supernode_command(self, name: str) -> list[str]:
        """The ``flower-supernode`` command line of one site."""
        node = self.nodes[name]
        cmd = [flower_command("flower-supernode"), "--superlink", self.address, "--host", "127.0.0.1",
               "--port", str(node.port), "--node-config", f'data-path="{node.data_path}"']
        if self.tls and self.pki is not None:
            cmd += ["--root-certificates", str(self.pki.ca_cert)]
        else:
            cmd += ["--insecure"]
        if self.auth and node.private_key is not None:
            cmd += ["--auth-supernode-private-key", str(node.private_key)]
        return cmd

    def start_node(self, name: str, wait: bool = True) -> None:
        """Start a site's SuperNode; with ``wait``, return once it is connected (its node id is logged)."""
        node = self.nodes[name]
        node.home.mkdir(parents=True, exist_ok=True)
        self._offsets[name] = self._log_size(self._node_proc(name))
        self.processes.start(self._node_proc(name), self.supernode_command(name), self._env(node.home),
                             cwd=node.home)
        if wait:
            self.wait_node(name)

    def wait_node(self, name: str, timeout_s: float | None = None) -> int:
        """Wait until a site's SuperNode logs its node id (it is connected); returns the id."""
        proc = self._node_proc(name)
        offset = self._offsets.get(name, 0)
        self._wait_for(lambda: _NODE_ID.search(self._log_since(proc, offset)) is not None, proc,
                       f"SuperNode {name} to connect to {self.address}", timeout_s)
        match = _NODE_ID.search(self._log_since(proc, offset))
        node_id = int(match.group(1)) if match else -1
        node = self.nodes[name]
        if node.node_id is not None and node.node_id != node_id:
            log.warning("site %s connected as node %d, registered as %d", name, node_id, node.node_id)
        node.node_id = node_id
        return node_id

    def rejoin_node(self, name: str, timeout_s: float = 120.0, retry_s: float = 3.0) -> int:
        """Restart a site's SuperNode until the SuperLink lets it in again, as ``Restart=always`` would.

        A SuperNode that crashed stays *online* at the SuperLink until its heartbeat lease runs out (Flower
        1.42: 2 x 30 s), and the SuperLink refuses to activate it again until then (the SuperNode exits with
        code 305). Returns the node id, the same as before for a registered key.
        """
        deadline = time.monotonic() + timeout_s
        attempts = 0
        while True:
            attempts += 1
            self.start_node(name, wait=False)
            try:
                node_id = self.wait_node(name, timeout_s=max(1.0, deadline - time.monotonic()))
                log.info("site %s rejoined as node %d (attempt %d)", name, node_id, attempts)
                return node_id
            except DeploymentError:
                if self.node_running(name) or time.monotonic() + retry_s > deadline:
                    raise
            time.sleep(retry_s)

    def stop_node(self, name: str, crash: bool = False) -> None:
        """Stop a site's SuperNode and its descendants (``crash``: SIGKILL, as a power cut)."""
        (self.processes.kill if crash else self.processes.stop)(self._node_proc(name))

    def node_running(self, name: str) -> bool:
        proc = self.processes.managed.get(self._node_proc(name))
        return proc is not None and proc.running()

    def node_log(self, name: str) -> str:
        proc = self.processes.managed.get(self._node_proc(name))
        return proc.log_tail(100_000) if proc else ""

    # -- runs --------------------------------------------------------------------------------------------------
    def run_study(self, study_path: Path, result_dir: Path, timeout_s: float = 1800.0,
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
        if self.app_dir is None:
            raise DeploymentError("the federation is not started")
        result_dir = Path(result_dir).resolve()
        config = {"study-config": str(Path(study_path).resolve()), "result-dir": str(result_dir),
                  **(extra_config or {})}
        run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        cmd = [flower_command("flwr"), "run", str(self.app_dir), CONNECTION, "--run-config", run_config, "--stream"]
        outcome = RunOutcome(None, "not started", result_dir)
        start = time.monotonic()
        deadline = start + timeout_s
        streamed: list[str] = []  # the run's log lines shown so far (a re-attached stream replays them)
        superlink_pid = self._superlink_pid()
        while True:
            self._follow(cmd, outcome, streamed, deadline, on_line or _log_line)
            if outcome.run_id is None:
                break
            if time.monotonic() > deadline:
                outcome.status = "timed out"
                self.stop_run(outcome.run_id)
                break
            if not self._wait_superlink(min(restart_grace_s, max(0.0, deadline - time.monotonic()))):
                outcome.status = "superlink lost"
                break
            if self._superlink_pid() != superlink_pid and not self.separate_superexec:
                outcome.status = "interrupted"
                self.stop_run(outcome.run_id)
                break
            outcome.status = self.run_status(outcome.run_id, wait_s=5.0)
            if outcome.status.startswith("finished"):
                break
            log.warning("the log stream of run %s ended while the run is %s (SuperLink restart?); re-attaching",
                        outcome.run_id, outcome.status)
            outcome.reattached += 1
            cmd = [flower_command("flwr"), "log", str(outcome.run_id), CONNECTION, "--stream"]
        outcome.seconds = time.monotonic() - start
        return outcome

    def _follow(self, cmd: list[str], outcome: RunOutcome, streamed: list[str], deadline: float,
                on_line: Callable[[str], None]) -> None:
        """Run a streaming ``flwr`` command until it ends, the SuperLink is gone or the deadline passes."""
        lines: queue.Queue[str | None] = queue.Queue()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self._env(self.cli_home), cwd=self.cli_home, text=True, errors="replace",
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
                if self.superlink_running():
                    lost_at = None
                elif time.monotonic() - (lost_at := lost_at or time.monotonic()) > 5.0:
                    return
        finally:
            _stop_popen(proc)
            reader.join(timeout=5)

    def _superlink_pid(self) -> int | None:
        proc = self.processes.managed.get("superlink")
        return proc.pid if proc is not None else None

    def _wait_superlink(self, timeout_s: float) -> bool:
        """Whether the SuperLink serves (again) within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not (self.superlink_running() and self._port_open()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def run_status(self, run_id: int | None, wait_s: float = 20.0) -> str:
        """A run's status as ``flwr ls`` reports it (e.g. ``finished:completed``), once it has finished."""
        if run_id is None:
            return "not started"
        deadline = time.monotonic() + wait_s
        status = "unknown"
        while True:
            proc = subprocess.run([flower_command("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format",
                                   "json"], env=self._env(self.cli_home), cwd=self.cli_home, capture_output=True,
                                  text=True, timeout=60, check=False)
            try:
                runs = json.loads(proc.stdout[proc.stdout.find("{"):]).get("runs", [])
                status = str(runs[0]["status"]) if runs else "unknown"
            except (json.JSONDecodeError, KeyError, IndexError):
                status = "unknown"
            if status.startswith("finished") or time.monotonic() > deadline:
                return status
            time.sleep(0.5)

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (``flwr stop``)."""
        subprocess.run([flower_command("flwr"), "stop", str(run_id), CONNECTION], env=self._env(self.cli_home),
                       cwd=self.cli_home, capture_output=True, text=True, timeout=60, check=False)

    # -- helpers -----------------------------------------------------------------------------------------------
    @staticmethod
    def _node_proc(name: str) -> str:
        return f"supernode-{name}"

    def _env(self, flwr_home: Path) -> dict[str, str]:
        return self.processes.tagged_env(flwr_env(flwr_home, self.env))

    def _write_cli_config(self) -> None:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        conn = [f'address = "{self.address}"']
        if self.tls and self.pki is not None:
            conn.append(f'root-certificates = "{self.pki.ca_cert}"')
        else:
            conn.append("insecure = true")
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n' + "\n".join(conn) + "\n")

    def _port_open(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True
        return False

    def _log_size(self, proc_name: str) -> int:
        path = self.processes.log_dir / f"{proc_name}.log"
        return path.stat().st_size if path.is_file() else 0

    def _log_since(self, proc_name: str, offset: int) -> str:
        path = self.processes.log_dir / f"{proc_name}.log"
        if not path.is_file():
            return ""
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")

    def _wait_for(self, ready: Callable[[], bool], proc_name: str, what: str, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        proc = self.processes.managed[proc_name]
        while not ready():
            if not proc.running():
                raise DeploymentError(f"waiting for {what}: the process exited with code {proc.popen.returncode}; "
                                      f"its log ({proc.log_path}) ends with:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"waiting for {what}: nothing after {timeout_s or self.startup_timeout_s:.0f}s;"
                                      f" its log ({proc.log_path}) ends with:\n{proc.log_tail()}")
            time.sleep(0.1)


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


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _log_line(line: str) -> None:
    log.info("%s", _ANSI.sub("", line))
