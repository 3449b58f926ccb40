"""Site policy at the SuperNode: the approved-app rule, the refusal log, and the app hash it relies on."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from client.apphash import directory_app_hash, fab_app_hash, installed_app_root
from client.guard import check_app, check_request, record_refusal
from common.errors import PolicyError
from common.sitedata import SiteConfig, SitePolicy, load_site_config

APPROVED = "a" * 64


def _config(small_sites: list[Path], **policy: object) -> SiteConfig:
    base = load_site_config(small_sites[0])
    return base.model_copy(update={"policy": SitePolicy(**policy)})  # type: ignore[arg-type]


def test_approved_apps_rule(small_sites: list[Path]) -> None:
    config = _config(small_sites, approved_apps=(APPROVED,))
    check_app(config, APPROVED)  # approved: no error
    with pytest.raises(PolicyError, match="approved_apps") as err:
        check_app(config, "b" * 64)
    assert err.value.rule == "approved_apps" and "bbbbbbbbbbbb" in str(err.value)
    # an empty list approves nothing: the site's SuperExec runs no app until the site lists one
    with pytest.raises(PolicyError, match="approved_apps"):
        check_app(_config(small_sites), APPROVED)
    # the request rules do not look at the app (checked before any app code runs); they apply in order
    open_config = _config(small_sites, allowed_phases=("fingerprint",))
    check_request(open_config, "fingerprint", "s" * 64, 6)
    with pytest.raises(PolicyError) as err:
        check_request(open_config, "rollcall", "s" * 64, 6)
    assert err.value.rule == "allowed_phases"


def test_refusal_is_logged_at_the_site(tmp_path: Path) -> None:
    err = PolicyError("site-009", "min_cohort", "3 usable case(s), policy needs at least 5")
    path = record_refusal(tmp_path, err, "query.fingerprint", run_id=42, study_hash="c" * 64)
    record_refusal(tmp_path, PolicyError("site-009", "allowed_phases", "no"), "query.rollcall")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert path == tmp_path / "derived" / "policy-refusals.jsonl"
    assert [e["rule"] for e in lines] == ["min_cohort", "allowed_phases"]
    assert lines[0]["run_id"] == 42 and lines[0]["message_type"] == "query.fingerprint"
    assert "policy needs at least 5" in lines[0]["detail"]


def _fab(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_app_hash_same_from_fab_and_installed_folder(tmp_path: Path) -> None:
    files = {"pyproject.toml": b"[project]\nname='x'\n", "client/app.py": b"app = 1\n", "server/app.py": b"x = 2\n"}
    root = tmp_path / "apps" / "fedbiopsy.fedbiopsy.0.1.0.0123abcd"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    # what Flower adds when it installs, and byte-code written when the app runs, do not count
    (root / ".info").mkdir()
    (root / ".info" / "CONTENT").write_text("manifest")
    (root / "client" / "__pycache__").mkdir()
    (root / "client" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    fab = _fab({**files, ".info/CONTENT": b"other manifest"})

    assert directory_app_hash(root) == fab_app_hash(fab)
    assert installed_app_root(root / "client" / "app.py") == root
    assert installed_app_root(Path(__file__)) is None  # the source tree is not an installed app
    (root / "client" / "app.py").write_bytes(b"app = 2\n")  # one changed byte: another app
    assert directory_app_hash(root) != fab_app_hash(fab)
