"""One hospital of a local federation: what it installs once, and the two processes it runs.

A hospital installs its own copy of the app, reviews and approves that copy's hash (``site.yaml``
``policy.approved_apps``), and shares a SuperExec secret between its SuperNode and its site SuperExec. It then
runs Flower's SuperNode through :mod:`deploy.supernode` (``--isolation process``: the SuperNode runs no app
itself) and :mod:`deploy.site_exec`, which answers the SuperNode's tasks only from the approved, installed copy.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from common.sitedata import load_site_config, write_site_config
from deploy.app import app_hash, stage_app

__all__ = ["SiteNode", "approve_app", "install_site", "site_exec_command", "write_secret"]


@dataclass
class SiteNode:
    """One hospital of the local federation: its data folder, key pair, installed app and SuperNode state."""

    name: str
    data_path: Path
    home: Path
    port: int
    private_key: Path | None = None
    public_key: Path | None = None
    node_id: int | None = None
    app_dir: Path | None = None  # the app this hospital installed (its site SuperExec runs only that)
    secret: Path | None = None  # the SuperExec secret shared by its SuperNode and its site SuperExec


def write_secret(path: Path) -> Path:
    """Write 32 random bytes to ``path``, created with mode 600 (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    return path


def approve_app(site_dir: Path, approved: str) -> None:
    """Add an app hash to a site's ``policy.approved_apps`` (kept as it is when already listed)."""
    config = load_site_config(site_dir)
    if approved not in config.policy.approved_apps:
        policy = config.policy.model_copy(update={"approved_apps": (*config.policy.approved_apps, approved)})
        write_site_config(config.model_copy(update={"policy": policy}), site_dir)


def install_site(node: SiteNode, folder: Path, app_source: Path, approve: bool) -> None:
    """Install the app from ``app_source`` into ``folder/app``, create ``folder/superexec.secret`` (mode 600),
    and with ``approve`` approve the installed copy's hash at the site (a rehearsal's sites approve the app of
    this checkout; a real site reviews it first)."""
    node.app_dir = stage_app(folder / "app", app_source)
    node.secret = write_secret(folder / "superexec.secret")
    if approve:
        approve_app(node.data_path, app_hash(node.app_dir))


def site_exec_command(node: SiteNode) -> list[str]:
    """The site's own SuperExec (:mod:`deploy.site_exec`) for its SuperNode; run it from ``node.app_dir``."""
    return [sys.executable, "-m", "deploy.site_exec", "--runtime-api-address", f"127.0.0.1:{node.port}",
            "--site", str(node.data_path), "--app-dir", str(node.app_dir),
            "--superexec-auth-secret-file", str(node.secret)]
