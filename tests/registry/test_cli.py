"""``fedbiopsy registry ...`` over the scripted history: outputs, exit statuses and error messages."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.registry import app  # what cli/main.py mounts as `fedbiopsy registry`
from server.registry import Registry

runner = CliRunner()


@pytest.fixture
def folder(history: Registry) -> str:
    history.close()
    return str(history.location.folder)


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "250"})
    return result.exit_code, result.output


def test_list_show_lineage_touched_by(folder: str) -> None:
    code, out = _run("list", "-r", folder, "--kind", "classifier")
    assert code == 0 and "3 version(s)" in out and all(f"v{i} " in out for i in (3, 4, 5)) and "v6 " not in out
    code, out = _run("show", "v5", "-r", folder, "--json")
    record = json.loads(out)
    assert code == 0 and record["label"] == "v5" and record["epsilon"] == {"A": 1.5, "B": 2.5}
    code, out = _run("lineage", "v4", "--registry", folder)
    assert code == 0 and "sites in the lineage: A, B, C, E" in out
    code, out = _run("touched-by", "E", "-r", folder)
    assert code == 0 and "2 version(s) touched by E" in out and "via v4" in out


def test_verify_exit_status_names_the_first_broken_link(folder: str) -> None:
    code, out = _run("verify", "-r", folder)
    assert code == 0 and "ok: 19 audit event(s), 7 version(s), 7 artifact(s)" in out
    head = out.split("head ")[-1].split()[0]  # printed whole, <seq>:<sha256>, as study.json publishes it
    assert head.startswith("19:") and len(head) == 3 + 64
    assert _run("verify", "-r", folder, "--head", head)[0] == 0
    code, out = _run("verify", "-r", folder, "--head", "20:" + head[3:])
    assert code == 1 and "BROKEN: audit head: the published head #20" in out
    with sqlite3.connect(Path(folder) / "registry.sqlite") as db:
        db.execute("DELETE FROM audit_events WHERE seq = 12")
    code, out = _run("verify", "-r", folder)
    assert code == 1 and "BROKEN: audit event #12: missing" in out


def test_card_and_export(folder: str, tmp_path: Path) -> None:
    code, out = _run("card", "v5", "-r", folder)
    assert code == 0 and out.startswith("# Model card: v5 (classifier, round 3)")
    code, out = _run("card", "v5", "-r", folder, "--json")
    assert code == 0 and json.loads(out)["version"] == "v5"
    code, out = _run("export", "v5", str(tmp_path / "bundle"), "-r", folder)
    assert code == 0 and (tmp_path / "bundle" / "v5-clf3.pt").read_bytes() == b"round-3 weights"


def test_bad_input_exits_2_with_the_reason(folder: str, tmp_path: Path) -> None:
    code, out = _run("show", "v42", "-r", folder)
    assert code == 2 and "no model version 'v42'" in out
    code, out = _run("lineage", "v42", "-r", folder)
    assert code == 2 and "no model version 'v42'" in out
    code, out = _run("list", "-r", str(tmp_path / "none"))
    assert code == 2 and "no registry at" in out
