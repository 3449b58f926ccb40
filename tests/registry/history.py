"""A scripted registry history (no Flower) shared by the registry tests.

Run 1 (study ``s1``): fingerprint {A, B, C} -> v1 plan; harmonisation {A, B} -> v2; classifier rounds
1 {A, B} -> v3 (parent: harmonisation), 2 {A, B, E} -> v4, 3 {A, B} -> v5 (metrics incl. external site C, DP).
Run 2 (study ``s2``, site A's data changed): fingerprint {A, B} -> v6 plan; segmentation round 1 {A, B} -> v7.
Site D never took part.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.config import StudyConfig
from server.registry import Registry

MANIFEST = {"A": "a" * 64, "B": "b" * 64, "C": "c" * 64}
MANIFEST_RUN2 = {"A": "d" * 64, "B": "b" * 64}
V5_METRICS = {"A": {"auc": 0.80, "fpr": 0.10}, "B": {"auc": 0.70, "fpr": 0.30}, "C": {"auc": 0.65, "fpr": 0.20},
              "pooled": {"auc": 0.75}}


def _write(result_dir: Path, name: str, content: bytes) -> str:
    result_dir.mkdir(parents=True, exist_ok=True)
    (result_dir / name).write_bytes(content)
    return name


def _fps(manifest: dict[str, str], cases: dict[str, int]) -> dict:
    return {s: {"manifest_hash": h, "n_cases": cases[s] + 1} for s, h in manifest.items()}


def build_history(reg: Registry, root: Path, dp_delta: float | None = 1e-5) -> None:
    """Record the two runs above into ``reg``; artifact files go under ``root``."""
    out = root / "run1"
    run = reg.start_run(StudyConfig(name="s1"), out)
    cases = {"A": 5, "B": 6, "C": 4}
    reg.record_phase(run, "fingerprint", {
        "artifacts": [{"kind": "plan", "path": _write(out, "plan.json", json.dumps({
            "scanners": {"A": {"vendor": "Siemens", "field_strength": 3.0},
                         "B": {"vendor": "GE", "field_strength": 1.5},
                         "C": {"vendor": "Philips", "field_strength": 3.0}}}).encode())}],
        "data_fingerprints": _fps(MANIFEST, cases)}, cases, out)
    reg.record_phase(run, "harmonisation", {"artifacts": [
        {"kind": "harmonisation", "path": _write(out, "combat.json", b'{"gamma": [1, 2]}'),
         "settings_hash": "f" * 64}]}, {"A": 5, "B": 6}, out)
    reg.record_phase(run, "classifier", {"artifacts": [
        {"kind": "classifier", "path": _write(out, "clf1.pt", b"round-1 weights"), "round": 1,
         "parent_kind": "harmonisation", "participants": {"A": 5, "B": 6}},
        {"kind": "classifier", "path": _write(out, "clf2.pt", b"round-2 weights"), "round": 2},
        {"kind": "classifier", "path": _write(out, "clf3.pt", b"round-3 weights"), "round": 3,
         "participants": {"A": 5, "B": 6}, "metrics": V5_METRICS, "epsilon": {"A": 1.5, "B": 2.5}, "delta": dp_delta},
    ]}, {"A": 5, "B": 6, "E": 3}, out)
    reg.finish_run(run)

    out2 = root / "run2"
    run2 = reg.start_run(StudyConfig(name="s2"), out2)
    cases2 = {"A": 7, "B": 6}
    reg.record_phase(run2, "fingerprint", {
        "artifacts": [{"kind": "plan", "path": _write(out2, "plan.json", b'{"scanners": {}}')}],
        "data_fingerprints": _fps(MANIFEST_RUN2, cases2)}, cases2, out2)
    reg.record_phase(run2, "segmentation", {"artifacts": [
        {"kind": "segmentation", "path": _write(out2, "seg1.pt", b"seg round 1"), "round": 1,
         "metrics": {"A": {"dsc": 0.81}, "B": {"dsc": 0.77}}}]}, cases2, out2)
    reg.finish_run(run2)
