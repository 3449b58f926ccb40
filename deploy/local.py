"""A real Flower federation on this machine: one ``flower-superlink`` and one ``flower-supernode`` per site.

Everything listens on 127.0.0.1 on free ports; each process has its own ``FLWR_HOME`` (as each hospital
would), telemetry and update checks are off and runtime dependency installation is disabled (the app runs
in this environment, as on an offline hospital machine). With TLS (the default) the SuperLink serves a
certificate signed by a fresh study CA and authenticates SuperNodes: each site's EC P-384 public key is
registered with ``flwr supernode register`` before its SuperNode starts. A study is submitted with
``flwr run`` and its log streamed (:mod:`deploy.runs`); every process started here is stopped (by pid, with
its descendants, :mod:`deploy.processes`) when the federation is closed, on error or on Ctrl-C. How a process
is seen to be up is :mod:`deploy.supervision`.

    with LocalFederation(site_dirs, work_dir) as fed:
        outcome = fed.run_study(study_yaml, result_dir)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from common.errors import ConfigError
from common.sitedata import load_site_config
from deploy import runs
from deploy.app import REPO_ROOT, stage_app
from deploy.certificates import StudyPki, create_node_keys, create_study_pki, flwr_env, register_node
from deploy.hospital import SiteNode, install_site, site_exec_command, write_secret
from deploy.processes import Processes, flower_command
from deploy.runs import RunOutcome
from deploy.supernode import POLL_VARIABLE
from deploy.supervision import (
    CONNECTION,
    DeploymentError,
    base_env,
    free_port,
    log_since,
    log_size,
    port_open,
    wait_for,
)

log = logging.getLogger(__name__)
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")

__all__ = ["LocalFederation", "SiteNode"]


class LocalFederation:
    """A SuperLink and one SuperNode per site directory, on loopback; a context manager.

    ``tls=False`` runs everything with ``--insecure`` and without node authentication (never for real
    data). ``auth`` (default: same as ``tls``) turns on SuperNode authentication. The SuperLink keeps its
    state in ``<work>/superlink/state.db``; with ``separate_superexec`` (default, as in the templates) the
    ServerApps run under a ``flower-superexec`` of their own (SuperLink ``--isolation process``), so a study
    survives a SuperLink restart; otherwise under the SuperLink's built-in one (Flower's default).

    Each site runs its own SuperExec (:mod:`deploy.site_exec`; SuperNode ``--isolation process``) from its own
    installed copy of the app, whose hash ``approve_app`` adds to the site's ``policy.approved_apps``: a
    submitted app other than that copy is refused before any of its code runs. ``site_exec=False`` leaves
    Flower's default (one ``flwr-clientapp`` per message, running whatever was submitted): only to show what
    the site SuperExec prevents. SuperNodes poll every ``poll_s`` seconds when idle (:mod:`deploy.supernode`).
    Hospitals reach the SuperLink only through the gateway (:mod:`deploy.gateway`, :attr:`address`: the Fleet
    API alone); the SuperLink itself (:attr:`link_address`: Control and Runtime APIs) is the operator's.
    """

    def __init__(self, site_dirs: Sequence[Path], work_dir: Path, tls: bool = True, auth: bool | None = None,
                 app_dir: Path = REPO_ROOT, startup_timeout_s: float = 90.0, separate_superexec: bool = True,
                 approve_app: bool = True, site_exec: bool = True, poll_s: float = 0.25) -> None:
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
        self.approve_app = approve_app
        self.site_exec = site_exec
        self.poll_s = poll_s
        self.env = base_env()
        self.processes = Processes(self.work / "logs")
        self.superlink_home = self.work / "superlink"
        self.cli_home = self.work / "cli"
        self.database = self.superlink_home / "state.db"
        self.port = free_port()  # the gateway (deploy.gateway): all hospitals see, the Fleet API only
        self.address = f"127.0.0.1:{self.port}"
        self.link_port = free_port()  # the SuperLink itself: Control and Runtime APIs, loopback only
        self.link_address = f"127.0.0.1:{self.link_port}"
        self.superexec_secret = self.superlink_home / "superexec.secret"
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
        for node in self.nodes.values():
            self.install_app(node)
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
        cmd = [flower_command("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.link_port),
               "--database", str(self.database), "--disable-runtime-dependency-installation"]
        if self.tls and self.pki is not None:
            cmd += ["--ssl-certfile", str(self.pki.server_cert), "--ssl-keyfile", str(self.pki.server_key),
                    "--ssl-ca-certfile", str(self.pki.ca_cert)]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        if self.separate_superexec:
            cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(self.superexec_secret)]
        return cmd

    def gateway_command(self) -> list[str]:
        """The gateway (:mod:`deploy.gateway`) that serves hospitals the Fleet API and nothing else."""
        cmd = [sys.executable, "-m", "deploy.gateway", "--listen", self.address, "--upstream", self.link_address]
        if self.tls and self.pki is not None:
            cmd += ["--ssl-certfile", str(self.pki.server_cert), "--ssl-keyfile", str(self.pki.server_key),
                    "--ca-certfile", str(self.pki.ca_cert)]
        else:
            cmd += ["--insecure"]
        return cmd

    def superexec_command(self) -> list[str]:
        """The ``flower-superexec`` that runs ServerApps when it is separate from the SuperLink."""
        cmd = [flower_command("flower-superexec"), "--runtime-api-address", self.link_address,
               "--superexec-auth-secret-file", str(self.superexec_secret)]
        if self.tls and self.pki is not None:
            cmd += ["--root-certificates", str(self.pki.ca_cert)]
        else:
            cmd += ["--insecure"]
        return cmd

    def start_superlink(self) -> None:
        """Start the SuperLink (its state persists in ``superlink/state.db``) and wait until it serves."""
        self.superlink_home.mkdir(parents=True, exist_ok=True)
        if not self.superexec_secret.is_file():
            write_secret(self.superexec_secret)
        offset = log_size(self.processes, "superlink")
        proc = self.processes.start("superlink", self.superlink_command(), self._env(self.superlink_home),
                                    cwd=self.superlink_home)
        self._wait_for(lambda: "Uvicorn running on" in log_since(self.processes, "superlink", offset)
                       and port_open(self.link_port), "superlink",
                       f"the SuperLink (pid {proc.pid}) to serve {self.link_address}")
        gateway = self.processes.managed.get("gateway")
        if gateway is None or not gateway.running():
            self.processes.start("gateway", self.gateway_command(), {**self.env, "PYTHONPATH": str(self.app_dir)},
                                 cwd=self.app_dir)
            self._wait_for(lambda: port_open(self.port), "gateway", f"the gateway to serve {self.address}")
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
        """Whether the SuperLink process is alive."""
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

    def install_app(self, node: SiteNode) -> None:
        """What the hospital does once (:func:`deploy.hospital.install_site`), approving with ``approve_app``."""
        install_site(node, self.work / "nodes" / node.name, self.app_source, self.approve_app)

    def supernode_command(self, name: str) -> list[str]:
        """The ``flower-supernode`` command line of one site."""
        node = self.nodes[name]
        launcher = ([sys.executable, "-m", "deploy.supernode"] if self.site_exec
                    else [flower_command("flower-supernode")])
        cmd = [*launcher, "--superlink", self.address, "--host", "127.0.0.1",
               "--port", str(node.port), "--node-config", f'data-path="{node.data_path}"']
        if self.tls and self.pki is not None:
            cmd += ["--root-certificates", str(self.pki.ca_cert)]
        else:
            cmd += ["--insecure"]
        if self.auth and node.private_key is not None:
            cmd += ["--auth-supernode-private-key", str(node.private_key)]
        if self.site_exec:
            cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(node.secret)]
        return cmd

    def start_node(self, name: str, wait: bool = True) -> None:
        """Start a site's SuperNode; with ``wait``, return once it is connected (its node id is logged)."""
        node = self.nodes[name]
        node.home.mkdir(parents=True, exist_ok=True)
        self._offsets[name] = log_size(self.processes, self._node_proc(name))
        if node.app_dir is None:
            self.install_app(node)
        env = self._env(node.home)
        if self.site_exec:  # the site's launcher of Flower's SuperNode (deploy.supernode), from the site's app
            env |= {"PYTHONPATH": str(node.app_dir), POLL_VARIABLE: str(self.poll_s)}
        self.processes.start(self._node_proc(name), self.supernode_command(name), env, cwd=node.home)
        if self.site_exec:
            self.start_site_exec(name)
        if wait:
            self.wait_node(name)

    def start_site_exec(self, name: str) -> None:
        """Start a site's own SuperExec (unless it runs), from the site's app folder (its modules are that folder's)."""
        node, exec_proc = self.nodes[name], self._exec_proc(name)
        if (old := self.processes.managed.get(exec_proc)) is not None and old.running():
            return  # it survives its SuperNode's restarts (it retries the Runtime API): no re-import per retry
        # a rehearsal's sites share this machine, as the simulation's virtual sites share its cores
        threads = str(max(1, (os.cpu_count() or 1) // max(1, len(self.nodes))))
        env = {**self._env(node.home), "PYTHONPATH": str(node.app_dir), "PYTHONDONTWRITEBYTECODE": "1",
               "OMP_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        self._offsets[exec_proc] = log_size(self.processes, exec_proc)
        self.processes.start(exec_proc, site_exec_command(node), env, cwd=node.app_dir)

    def wait_node(self, name: str, timeout_s: float | None = None) -> int:
        """Wait until a site's SuperNode logs its node id (it is connected); returns the id."""
        proc = self._node_proc(name)
        offset = self._offsets.get(name, 0)
        self._wait_for(lambda: _NODE_ID.search(log_since(self.processes, proc, offset)) is not None, proc,
                       f"SuperNode {name} to connect to {self.address}", timeout_s)
        match = _NODE_ID.search(log_since(self.processes, proc, offset))
        node_id = int(match.group(1)) if match else -1
        node = self.nodes[name]
        if node.node_id is not None and node.node_id != node_id:
            log.warning("site %s connected as node %d, registered as %d", name, node_id, node.node_id)
        node.node_id = node_id
        if self.site_exec:
            exec_proc, exec_offset = self._exec_proc(name), self._offsets.get(self._exec_proc(name), 0)
            self._wait_for(lambda: "serving app" in log_since(self.processes, exec_proc, exec_offset), exec_proc,
                           f"the site SuperExec of {name} to serve its approved app", timeout_s)
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
        stop = self.processes.kill if crash else self.processes.stop
        stop(self._node_proc(name))
        if self._exec_proc(name) in self.processes.managed:
            stop(self._exec_proc(name))

    def node_running(self, name: str) -> bool:
        """Whether a site's SuperNode process is alive."""
        proc = self.processes.managed.get(self._node_proc(name))
        return proc is not None and proc.running()

    def node_log(self, name: str) -> str:
        """The end (100 kB) of a site's SuperNode log."""
        proc = self.processes.managed.get(self._node_proc(name))
        return proc.log_tail(100_000) if proc else ""

    # -- runs (deploy.runs) ------------------------------------------------------------------------------------
    def run_study(self, study_path: Path, result_dir: Path, timeout_s: float = 1800.0,
                  on_line: Callable[[str], None] | None = None, extra_config: dict[str, object] | None = None,
                  restart_grace_s: float = 120.0) -> RunOutcome:
        """Submit the study with ``flwr run --stream`` and follow it to its end (:func:`deploy.runs.run_study`)."""
        return runs.run_study(self, study_path, result_dir, timeout_s, on_line, extra_config, restart_grace_s)

    def run_status(self, run_id: int | None, wait_s: float = 20.0) -> str:
        """A run's status as ``flwr ls`` reports it, once it has finished (:func:`deploy.runs.run_status`)."""
        return runs.run_status(self, run_id, wait_s)

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (``flwr stop``)."""
        runs.stop_run(self, run_id)

    def superlink_pid(self) -> int | None:
        """The pid of the SuperLink started last (None before the first start)."""
        proc = self.processes.managed.get("superlink")
        return proc.pid if proc is not None else None

    def wait_superlink(self, timeout_s: float) -> bool:
        """Whether the SuperLink serves (again) within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not (self.superlink_running() and port_open(self.link_port)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def cli_env(self) -> dict[str, str]:
        """The environment of the ``flwr`` CLI commands (its ``FLWR_HOME`` holds the connection's config)."""
        return self._env(self.cli_home)

    # -- helpers -----------------------------------------------------------------------------------------------
    @staticmethod
    def _node_proc(name: str) -> str:
        return f"supernode-{name}"

    @staticmethod
    def _exec_proc(name: str) -> str:
        return f"siteexec-{name}"

    def _env(self, flwr_home: Path) -> dict[str, str]:
        return self.processes.tagged_env(flwr_env(flwr_home, self.env))

    def _write_cli_config(self) -> None:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        conn = [f'address = "{self.link_address}"']  # the operator's CLI: on the SuperLink's host
        if self.tls and self.pki is not None:
            conn.append(f'root-certificates = "{self.pki.ca_cert}"')
        else:
            conn.append("insecure = true")
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n' + "\n".join(conn) + "\n")

    def _wait_for(self, ready: Callable[[], bool], proc_name: str, what: str, timeout_s: float | None = None) -> None:
        wait_for(self.processes, ready, proc_name, what, timeout_s or self.startup_timeout_s)
