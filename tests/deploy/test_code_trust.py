"""Code trust at a hospital: a submitted app the site did not approve runs none of its code there.

The probe is a modified copy of the app whose ``client`` package runs a side effect the moment it is
imported: it appends the importing process's Flower home to a marker file, as a shell command would
(``flwr run`` itself imports the app where it is submitted, so only a hospital's home counts). It is
submitted with ``flwr run`` to a real SuperLink and SuperNode twice. With Flower's default SuperNode (one
``flwr-clientapp`` per message, installing and importing whatever was submitted) it runs at the site, so the
probe is a real attack. With the site's own SuperExec (:mod:`deploy.site_exec`, the default of
:class:`deploy.local.LocalFederation`) it is refused by the ``approved_apps`` rule, logged at the site, and
never runs there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from deploy.app import app_hash
from deploy.local import LocalFederation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _evil_app(source: Path, dest: Path, marker: Path) -> Path:
    """A copy of the submitted app whose ``client`` package, when imported, appends the ``FLWR_HOME`` of the
    process that imported it to ``marker`` (``flwr run`` itself loads the app where it is submitted)."""
    shutil.copytree(source, dest)
    init = dest / "client" / "__init__.py"
    init.write_text(init.read_text() + "\nimport os as _os\n"
                    f"with open({str(marker)!r}, 'a') as _fh:\n"
                    "    _fh.write(_os.environ.get('FLWR_HOME', '') + '\\n')\n")
    return dest


def _ran_at_a_site(marker: Path, fed: LocalFederation) -> bool:
    """Whether a process of a hospital (its Flower home) imported the probe."""
    homes = {str(node.home) for node in fed.nodes.values()}
    return marker.exists() and any(line.startswith(tuple(homes)) for line in marker.read_text().splitlines())


def _submit(fed: LocalFederation, app_dir: Path, tmp: Path) -> tuple[bool, list[str]]:
    tmp.mkdir(parents=True, exist_ok=True)
    study = tmp / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "code-trust", "phases": ["rollcall"], "min_sites": 1,
                                     "round_timeout_s": 60}))
    approved, fed.app_dir = fed.app_dir, app_dir
    try:
        outcome = fed.run_study(study, tmp / "results", timeout_s=240)
    finally:
        fed.app_dir = approved
    return outcome.completed, outcome.log_lines


def test_modified_app_runs_code_under_flowers_default_supernode(writable_sites: list[Path], tmp_path: Path) -> None:
    # Prepare: Flower's default SuperNode (subprocess isolation: flwr-clientapp installs and imports the FAB)
    marker = tmp_path / "executed-at-site"
    with LocalFederation(writable_sites[:1], tmp_path / "work", tls=False, site_exec=False) as fed:
        evil = _evil_app(fed.app_dir, tmp_path / "evil", marker)  # type: ignore[arg-type]
        # Execute
        completed, _ = _submit(fed, evil, tmp_path)
        # Assert: the submitted code ran at the site (the attack works without the site SuperExec)
        assert completed and _ran_at_a_site(marker, fed)


def test_modified_app_is_refused_before_any_of_its_code_runs(writable_sites: list[Path], tmp_path: Path) -> None:
    # Prepare: the site's own SuperExec, which approved exactly its installed copy of the app
    marker = tmp_path / "executed-at-site"
    site = writable_sites[0]
    with LocalFederation([site], tmp_path / "work", tls=False) as fed:
        node = next(iter(fed.nodes.values()))
        evil = _evil_app(fed.app_dir, tmp_path / "evil", marker)  # type: ignore[arg-type]
        assert app_hash(evil) != app_hash(node.app_dir)  # type: ignore[arg-type]
        # Execute
        completed, lines = _submit(fed, evil, tmp_path)
        exec_log = fed.processes.managed[f"siteexec-{node.name}"].log_tail(20_000)
        ran_at_site = _ran_at_a_site(marker, fed)
        # the approved app still runs afterwards: the refusal is per FAB, not the end of the site
        ok, _ = _submit(fed, fed.app_dir, tmp_path / "again")  # type: ignore[arg-type]

    # Assert: refused by rule (the study fails for lack of a valid reply), nothing of the FAB ran or was
    # installed at the site, and the refusal is in the site's own log with the run it came from
    assert not completed and not ran_at_site
    assert any("policy rule 'approved_apps'" in line for line in lines)
    assert not list((node.home / "apps").glob("*")), "the FAB was installed at the site"
    assert "refused a message" in exec_log and "rule approved_apps" in exec_log
    entries = [json.loads(line) for line in (site / "derived" / "policy-refusals.jsonl").read_text().splitlines()]
    assert [(e["rule"], e["message_type"]) for e in entries] == [("approved_apps", "query.rollcall")]
    assert ok
