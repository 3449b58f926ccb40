"""The site SuperExec's check of each task, without Flower processes: which FABs it refuses, from bytes alone.

The end-to-end probe (a modified app submitted to a real SuperNode) is ``test_code_trust.py``; here each rule of
:meth:`deploy.site_exec.SiteExec.check_task` is exercised on crafted FABs, including one that unpacks to far
more than it weighs (a zip bomb must not be read to the end).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from client.apphash import fab_app_hash
from common.errors import ConfigError, PolicyError
from common.sitedata import load_site_config
from deploy.app import build_fab, stage_app
from deploy.hospital import approve_app
from deploy.site_exec import FAB_MAX_BYTES, SiteExec


def _site_exec(site: Path, installed_hash: str) -> SiteExec:
    """A SiteExec for ``site`` that serves the app ``installed_hash`` (no Runtime API, no loaded ClientApp)."""
    site_exec = SiteExec.__new__(SiteExec)
    site_exec.site_dir, site_exec.app_hash, site_exec._verdicts = site.resolve(), installed_hash, {}
    return site_exec


def _fab(app: Path) -> tuple[bytes, str]:
    content = build_fab(app)
    return content, hashlib.sha256(content).hexdigest()


@pytest.fixture
def apps(tmp_path: Path) -> tuple[Path, Path]:
    """The installed app and a modified copy (one comment line more in the ClientApp)."""
    installed = stage_app(tmp_path / "installed")
    modified = stage_app(tmp_path / "modified")
    target = modified / "client" / "app.py"
    target.write_text(target.read_text() + "\n# changed\n")
    return installed, modified


def test_only_the_approved_installed_app_is_answered(writable_sites: list[Path], apps: tuple[Path, Path]) -> None:
    site, (installed, modified) = writable_sites[0], apps
    content, sha = _fab(installed)
    approved = fab_app_hash(content)
    node = {"data-path": str(site)}
    site_exec = _site_exec(site, approved)
    # not (yet) approved by the site: refused, although it is the installed app
    with pytest.raises(PolicyError, match="not approved") as err:
        site_exec.check_task(load_site_config(site), content, sha, node)
    assert err.value.rule == "approved_apps"
    approve_app(site, approved)
    site_exec.check_task(load_site_config(site), content, sha, node)  # approved and installed: answered
    # a FAB whose bytes are not those its hash names
    with pytest.raises(PolicyError, match="does not match its hash"):
        site_exec.check_task(load_site_config(site), content, "0" * 64, node)
    # approved, but another version than the one installed here
    other, other_sha = _fab(modified)
    approve_app(site, fab_app_hash(other))
    with pytest.raises(PolicyError, match="not installed here"):
        site_exec.check_task(load_site_config(site), other, other_sha, node)
    # a SuperNode that serves another folder than this SuperExec's site
    with pytest.raises(ConfigError, match="data-path"):
        site_exec.check_task(load_site_config(site), content, sha, {"data-path": str(writable_sites[1])})


def test_oversized_unreadable_and_bomb_fabs_are_refused_unread(writable_sites: list[Path]) -> None:
    site = writable_sites[0]
    site_exec = _site_exec(site, "a" * 64)
    node = {"data-path": str(site)}
    big = b"0" * (FAB_MAX_BYTES + 1)
    with pytest.raises(PolicyError, match="at most"):
        site_exec.check_task(load_site_config(site), big, hashlib.sha256(big).hexdigest(), node)
    junk = b"not a zip file"
    with pytest.raises(PolicyError, match="cannot be read"):
        site_exec.check_task(load_site_config(site), junk, hashlib.sha256(junk).hexdigest(), node)
    # 64 MB of zeros in a ~64 kB zip: hashing stops at the unpacked-size cap, in chunks
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("client/app.py", "w") as fh:
        for _ in range(64):
            fh.write(bytes(1 << 20))
    bomb = buffer.getvalue()
    assert len(bomb) < 1 << 20
    with pytest.raises(ValueError, match="unpacks to more than"):
        fab_app_hash(bomb, max_unpacked=8 << 20)
    with pytest.raises(ValueError, match="entries"):
        fab_app_hash(bomb, max_entries=0)


def test_the_site_exec_runs_only_from_its_app_folder(writable_sites: list[Path], apps: tuple[Path, Path]) -> None:
    # this test process imports fedbiopsy from the checkout, not from the installed folder: refused to start
    with pytest.raises(ConfigError, match="not imported from the app folder"):
        SiteExec("127.0.0.1:1", writable_sites[0], apps[0])
