"""The hospital's own SuperExec: no submitted code runs at a site unless the site approved it, and one warm process.

A SuperNode started with ``--isolation process`` runs no ClientApp itself: it waits for a SuperExec to take
each task from its Runtime API (``127.0.0.1:<port>``, HMAC-authenticated with ``--superexec-auth-secret-file``).
Flower's own ``flower-superexec`` starts one ``flwr-clientapp`` per message, which installs the submitted app
(FAB) and imports it: the app's code runs before any check of it that the site wrote. This SuperExec is the
site's code instead, run from the app folder the hospital installed (``--app-dir``, e.g. ``/opt/fedbiopsy/app``):

1. At start it computes the app hash of its own folder (:func:`deploy.app.app_hash`: the hash of the FAB
   ``flwr run`` would submit from it) and refuses to start unless ``site.yaml`` ``policy.approved_apps``
   lists it; then it imports that ClientApp, once.
2. For each task it pulls the message and the run's FAB as *bytes* and computes the FAB's app hash
   (:func:`client.apphash.fab_app_hash`): nothing of the FAB is installed, unpacked to disk or imported. A FAB
   whose hash is not approved, or is not the installed app's, is answered with the ``approved_apps`` refusal
   (and logged in the site's ``derived/policy-refusals.jsonl``); otherwise the installed, identical code answers.

Because the code is the site's and stays imported, a message costs no process start, FAB install or import.

    python -m deploy.site_exec --runtime-api-address 127.0.0.1:9094 --site /data/site \
        --app-dir /opt/fedbiopsy/app --superexec-auth-secret-file /etc/fedbiopsy/superexec.secret
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import time
import zipfile
from pathlib import Path
from types import FrameType
from typing import Any

from client.apphash import fab_app_hash, fab_files, set_verified_app
from client.guard import check_app, public_reason, record_refusal
from common.errors import ConfigError, PolicyError
from common.protocol import ERROR_INTERNAL, ERROR_POLICY
from common.sitedata import SiteConfig, load_site_config
from deploy.app import build_fab
from server.federation import set_pull_backoff

log = logging.getLogger("fedbiopsy.site_exec")
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
FAB_MAX_BYTES = 10 * 1024 * 1024  # Flower's own FAB_MAX_SIZE: a larger FAB is refused unread
_IMPORTABLE = (".py", ".pyc", ".so", ".pth", ".pyd")
PROFILE_VARIABLE = "FEDBIOPSY_PROFILE_DIR"  # profile every task into this folder (diagnostics)


def _runtime_client(address: str, interceptors: list[Any], invokers: list[Any] | None = None) -> Any:
    """A Runtime API client of the SuperNode on loopback; its retry policy is added to ``invokers``."""
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    invoker = make_simple_http_retry_invoker()
    if invokers is not None:
        invokers.append(invoker)
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=invoker)


def check_app_dir(app_dir: Path, packed: set[str]) -> None:
    """Refuse to serve unless this process's fedbiopsy modules are the ones in ``app_dir`` and the folder holds
    no importable file that the hashed app (its FAB, ``packed``) leaves out."""
    for name in ("client", "common", "deploy"):
        module = sys.modules.get(name)
        where = Path(getattr(module, "__file__", "") or "").resolve()
        if module is None or not where.is_relative_to(app_dir):
            raise ConfigError(app_dir, f"package {name!r} is not imported from the app folder",
                              "start the site SuperExec with its working directory and PYTHONPATH set to --app-dir")
    extra = sorted(rel for p in app_dir.rglob("*") if p.is_file() and p.suffix in _IMPORTABLE
                   and "__pycache__" not in p.parts and (rel := p.relative_to(app_dir).as_posix()) not in packed)
    if extra:
        raise ConfigError(app_dir, f"{len(extra)} importable file(s) outside the approved app, e.g. {extra[0]}",
                          "reinstall the app folder from the release (only its own files)")


class SiteExec:
    """Takes the SuperNode's ClientApp tasks one at a time; answers each only from approved, installed code."""

    def __init__(self, runtime_api_address: str, site_dir: Path, app_dir: Path, secret: bytes | None = None,
                 poll_s: float = 0.1) -> None:
        self.address = runtime_api_address
        self.site_dir = Path(site_dir).resolve()
        self.app_dir = Path(app_dir).resolve()
        self.secret = secret
        self.poll_s = poll_s
        self.stopping = False
        self._invokers: list[Any] = []  # retry policies of the open clients: cut short on SIGTERM
        installed = build_fab(self.app_dir)  # what `flwr run` would submit from this folder
        check_app_dir(self.app_dir, fab_files(installed))
        self.app_hash = fab_app_hash(installed)
        self._verdicts: dict[str, str] = {}  # sha256 of a FAB seen -> its app hash ('' when unreadable)
        config = load_site_config(self.site_dir)
        try:
            check_app(config, self.app_hash)
        except PolicyError as err:
            raise ConfigError(self.site_dir / "site.yaml", f"the installed app {self.app_hash} is not approved",
                              "review it, then add its hash to policy.approved_apps (`fedbiopsy deploy app-hash "
                              "--app <app dir>` prints it)") from err
        set_verified_app(self.app_hash)
        self.client_app = self._load_client_app()
        log.info("site %s: serving app %s from %s", config.site_id, self.app_hash[:16], self.app_dir)

    def _load_client_app(self) -> Any:
        from flwr.clientapp.client_app import ClientApp, LoadClientAppError
        from flwr.common.config import get_project_config
        from flwr.supercore.object_ref import load_app

        ref = get_project_config(self.app_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
        app = load_app(ref, LoadClientAppError, self.app_dir)
        if not isinstance(app, ClientApp):
            raise ConfigError(self.app_dir / "pyproject.toml", f"{ref} is not a ClientApp", "reinstall the app")
        return app

    # -- one task ---------------------------------------------------------------------------------------------
    def serve(self, token: str) -> str:
        """Answer the task ``token`` names; returns what happened (``answered``, ``refused`` or ``failed``)."""
        from flwr.app import Error, Message
        from flwr.common.constant import SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.run import RunNotRunningException
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = _runtime_client(self.address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                                RuntimeTokenHttpInterceptor(token)], self._invokers)
        task_invoker = self._invokers[-1]
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context, outcome, status, details = None, "failed", SubStatus.FAILED, "site SuperExec failed"
        try:
            message, context, _run, fab = pull_task_input(client)
            config = load_site_config(self.site_dir)
            try:
                self.check_task(config, fab.content, fab.hash_str, context.node_config)
            except PolicyError as err:
                log.warning("refused a message of run %s: rule %s (%s)", context.run_id, err.rule, err)
                record_refusal(self.site_dir, err, message.metadata.message_type, context.run_id)
                reply = Message(Error(code=ERROR_POLICY, reason=public_reason(err, config.site_id)), reply_to=message)
                outcome, details = "refused", f"policy rule {err.rule}"
            except ConfigError as err:  # the site's own set-up is wrong: a fixed answer, the fix in its log
                log.error("%s", err)
                reply = Message(Error(code=ERROR_INTERNAL, reason=public_reason(RuntimeError(), config.site_id)),
                                reply_to=message)
            else:
                try:
                    reply = self.client_app(message=message, context=context)
                    outcome, status, details = "answered", SubStatus.COMPLETED, ""
                except Exception:  # noqa: BLE001 - the site answers a fixed text; the detail stays in its log
                    log.exception("the ClientApp failed on a %s message", message.metadata.message_type)
                    reply = Message(Error(code=ERROR_INTERNAL, reason=public_reason(RuntimeError(), config.site_id)),
                                    reply_to=message)
            push_message(client, reply, context)
        except (Exception, RunNotRunningException):  # noqa: BLE001 - one broken task must not stop the site
            log.exception("task failed before a reply could be pushed")
        finally:
            try:
                push_task_output(client=client, context=context, sub_status=status, details=details)
            except (Exception, RunNotRunningException):  # noqa: BLE001 - the task may be gone already
                log.warning("could not report the task's end to the SuperNode", exc_info=True)
            heartbeat.stop()
            client.close()
            self._invokers.remove(task_invoker)
        return outcome

    def check_task(self, config: SiteConfig, content: bytes, fab_hash: str, node_config: Any) -> None:
        """Raise :class:`PolicyError` (rule ``approved_apps``) unless the task's FAB is the approved, installed app
        and the SuperNode serves this SuperExec's site folder. Reads the FAB's bytes only; verdicts are cached."""
        site_id = config.site_id
        if len(content) > FAB_MAX_BYTES:
            raise PolicyError(site_id, "approved_apps", f"the FAB is {len(content)} bytes (at most {FAB_MAX_BYTES})")
        sha = hashlib.sha256(content).hexdigest()
        if sha != fab_hash:
            raise PolicyError(site_id, "approved_apps", "the FAB's content does not match its hash")
        if sha not in self._verdicts:
            try:
                self._verdicts[sha] = fab_app_hash(content)
            except (ValueError, zipfile.BadZipFile, OSError) as exc:
                log.warning("unreadable FAB %s: %s", sha[:12], exc)
                self._verdicts[sha] = ""
        submitted = self._verdicts[sha]
        if not submitted:
            raise PolicyError(site_id, "approved_apps", "the FAB cannot be read as an app")
        check_app(config, submitted)
        if submitted != self.app_hash:
            raise PolicyError(site_id, "approved_apps", f"app {submitted[:12]}... is approved but not installed here")
        served = Path(str(node_config.get("data-path", ""))).resolve()
        if served != self.site_dir:
            raise ConfigError(self.site_dir, f"the SuperNode serves data-path {served}, not this SuperExec's --site",
                              "start the SuperNode (--node-config data-path) and the site SuperExec on one folder")

    def _profiled(self, token: str, task_id: int) -> str:
        """:meth:`serve`, under cProfile when ``FEDBIOPSY_PROFILE_DIR`` names a folder (one ``.prof`` a task)."""
        folder = os.environ.get(PROFILE_VARIABLE)
        if not folder:
            return self.serve(token)
        import cProfile

        profiler = cProfile.Profile()
        try:
            return profiler.runcall(self.serve, token)
        finally:
            Path(folder).mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(str(Path(folder) / f"task-{task_id}.prof"))

    # -- the loop -----------------------------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Take and answer tasks until SIGTERM/SIGINT."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.run import RunNotRunningException

        def _stop(_sig: int, _frame: FrameType | None) -> None:
            # stop now, also mid-task (its SuperNode is stopping too): one last try for every open request
            self.stopping = True
            for invoker in self._invokers:
                invoker.max_tries = 1
            raise SystemExit(0)

        def _ignore(_sig: int, _frame: FrameType | None) -> None:
            # Flower's HTTP retry and task heartbeat SIGINT their own process when a token is refused or a task
            # is no longer valid (e.g. `flwr stop`): not a stop of the site. The task at hand runs to its end
            # (its reply is then dropped by the SuperNode); the next task is taken as usual.
            log.warning("SIGINT ignored (stop the site SuperExec with SIGTERM)")

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _ignore)
        set_pull_backoff()  # a task's message may still be arriving at the SuperNode when the task is taken
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if self.secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=self.secret, protected_methods={ACQUIRE}))
        client = _runtime_client(self.address, interceptors, self._invokers)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        try:
            while not self.stopping:
                try:
                    res = client.AcquireTask(request)
                except (Exception, RunNotRunningException):  # noqa: BLE001 - the SuperNode may be restarting
                    log.warning("no answer from the SuperNode's Runtime API; retrying", exc_info=True)
                    time.sleep(max(self.poll_s, 2.0))
                    continue
                if res.HasField("task") and res.token:
                    start = time.perf_counter()
                    outcome = self._profiled(res.token, res.task.task_id)
                    log.info("task %d of run %d %s in %.2f s", res.task.task_id, res.task.run_id, outcome,
                             time.perf_counter() - start)
                    continue
                time.sleep(self.poll_s)
        finally:
            client.close()


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m deploy.site_exec``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (loopback)")
    parser.add_argument("--site", type=Path, required=True, help="the site folder (its site.yaml decides)")
    parser.add_argument("--app-dir", type=Path, required=True, help="the app folder this hospital installed")
    parser.add_argument("--superexec-auth-secret-file", type=Path, help="the secret the SuperNode was given")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between polls for a task")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m deploy.site_exec``: the site's SuperExec for one SuperNode."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    secret = args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
    try:
        site_exec = SiteExec(args.runtime_api_address, args.site, args.app_dir, secret, args.poll)
    except ConfigError as err:
        log.error("%s", err)
        raise SystemExit(2) from err
    site_exec.run_forever()


if __name__ == "__main__":
    main()
