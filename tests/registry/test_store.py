"""The artifact store and bad input: damaged artifacts, bad artifact entries, copied registries."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from common.config import StudyConfig
from server.registry import ArtifactError, Registry, RegistryError, export_version, open_registry


def test_content_addressing_stores_each_content_once(registry: Registry, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(b"same bytes")
    (out / "b.bin").write_bytes(b"same bytes")
    run = registry.start_run(StudyConfig(), out)
    v1, v2 = registry.record_phase(run, "signature", {"artifacts": [
        {"kind": "signature", "path": "a.bin"}, {"kind": "signature", "path": str(out / "b.bin")}]}, {"A": 5}, out)
    assert v1.artifact_sha256 == v2.artifact_sha256 == hashlib.sha256(b"same bytes").hexdigest()
    files = [p for p in (registry.location.folder / "artifacts").rglob("*") if p.is_file()]
    assert files == [registry.store.path_of(v1.artifact_sha256)] and files[0].name == v1.artifact_sha256
    assert registry.artifact_bytes(v2.label) == b"same bytes"
    assert v2.parent_id == v1.id  # a second artifact of the same kind in a phase follows the first


def test_a_truncated_artifact_gives_a_clear_error_and_loses_nothing(history: Registry, tmp_path: Path) -> None:
    v5 = history.version("v5")
    stored = history.store.path_of(v5.artifact_sha256)
    stored.write_bytes(stored.read_bytes()[:4])
    with pytest.raises(ArtifactError, match=r"v5 \(classifier clf3.pt\): artifact .* is truncated: 4 of 15 bytes"):
        history.artifact_bytes("v5")
    with pytest.raises(ArtifactError, match="truncated"):
        export_version(history, "v5", tmp_path / "export")
    assert not (tmp_path / "export").exists()  # nothing half-written
    assert history.artifact_bytes("v4") == b"round-2 weights"  # the rest of the registry is intact
    assert history.lineage("v5")[0] == v5  # records are untouched
    # registering the original file again restores the stored copy
    history.store.put(tmp_path / "results" / "run1" / "clf3.pt")
    assert history.artifact_bytes("v5") == b"round-3 weights" and history.verify().ok


def test_bad_artifact_entries_are_refused_before_anything_is_recorded(registry: Registry, tmp_path: Path) -> None:
    run = registry.start_run(StudyConfig(), tmp_path)
    head = registry.head()
    with pytest.raises(RegistryError, match=r"phase 'classifier': artifact classifier file .*nope.pt does not exist"):
        registry.record_phase(run, "classifier", {"artifacts": [{"kind": "classifier", "path": "nope.pt"}]},
                              {"A": 5}, tmp_path)
    with pytest.raises(RegistryError, match=r"phase 'x': artifacts\[0\] is invalid \(kind: .*"):
        registry.record_phase(run, "x", {"artifacts": [{"kind": "weights", "path": "a"}]}, {"A": 5}, tmp_path)
    with pytest.raises(RegistryError, match="'artifacts' is a dict, not a list"):
        registry.record_phase(run, "x", {"artifacts": {"kind": "plan"}}, {"A": 5}, tmp_path)
    with pytest.raises(RegistryError, match="no run 99"):
        registry.record_phase(99, "x", {}, {}, tmp_path)
    assert registry.head() == head and registry.versions() == []
    registry.finish_run(run, error="boom")
    with pytest.raises(RegistryError, match="run 1 is failed"):
        registry.record_phase(run, "x", {}, {}, tmp_path)
    assert registry.events()[-1].kind == "run.failed" and registry.events()[-1].payload["record"]["error"] == "boom"


def test_unknown_keys_are_kept_and_undefined_metrics_stored_as_null(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(b"m")
    run = registry.start_run(StudyConfig(), tmp_path)
    (v,) = registry.record_phase(run, "classifier", {"artifacts": [
        {"kind": "classifier", "path": "m.pt", "metrics": {"A": {"auc": float("nan"), "acc": 0.5}},
         "n_rounds": 3}]}, {"A": 5}, tmp_path)
    assert v.metrics == {"A": {"auc": None, "acc": 0.5}} and v.extra == {"n_rounds": 3}
    assert registry.verify().ok


def test_a_copied_registry_still_verifies_and_works(history: Registry, tmp_path: Path) -> None:
    history.close()
    copy = tmp_path / "elsewhere" / "copied-registry"
    shutil.copytree(history.location.folder, copy)
    shutil.rmtree(history.location.folder)  # nothing may still point at the original
    with open_registry(copy, create=False) as reg:
        report = reg.verify()
        assert report.ok and report.n_events == 19 and report.n_versions == 7 and report.n_artifacts == 7
        assert reg.artifact_bytes("v5") == b"round-3 weights"
        assert [v.label for v in reg.lineage("v5")] == ["v5", "v4", "v3", "v2", "v1"]
        reg.append_event("registry.copied", "registry", {"to": "elsewhere"})
        assert reg.verify().ok and reg.head()[0] == 20
