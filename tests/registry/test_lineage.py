"""Lineage, parents, data fingerprints and touched-by over a scripted history."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import StudyConfig
from server.registry import Registry, UnknownVersionError
from tests.registry.history import MANIFEST, MANIFEST_RUN2


def test_parent_rules_and_links(history: Registry) -> None:
    v = {x.id: x for x in history.versions()}
    assert [(i, v[i].kind, v[i].round) for i in sorted(v)] == [
        (1, "plan", None), (2, "harmonisation", None), (3, "classifier", 1), (4, "classifier", 2),
        (5, "classifier", 3), (6, "plan", None), (7, "segmentation", 1)]
    # parent_kind, previous round, the run's plan; plan and harmonisation links; nothing crosses runs
    assert {i: v[i].parent_id for i in v} == {1: None, 2: 1, 3: 2, 4: 3, 5: 4, 6: None, 7: 6}
    assert {i: v[i].plan_id for i in v} == {1: None, 2: 1, 3: 1, 4: 1, 5: 1, 6: None, 7: 6}
    assert {i: v[i].harmonisation_id for i in v} == {1: None, 2: None, 3: 2, 4: 2, 5: 2, 6: None, 7: None}
    assert v[2].settings_hash == "f" * 64 and v[5].delta == 1e-5 and v[5].epsilon == {"A": 1.5, "B": 2.5}


def test_later_plans_and_models_chain_to_the_first_plan(registry: Registry, tmp_path: Path) -> None:
    for name in ("fp.json", "pre.json", "seg-plan.json", "seg1.npz"):
        (tmp_path / name).write_text(name)
    run = registry.start_run(StudyConfig(), tmp_path)
    sites = {"A": 5, "B": 6}
    registry.record_phase(run, "fingerprint", {"artifacts": [{"kind": "plan", "path": "fp.json"}]}, sites, tmp_path)
    registry.record_phase(run, "preprocessing", {"artifacts": [{"kind": "plan", "path": "pre.json"}]}, sites, tmp_path)
    seg = registry.record_phase(run, "segmentation", {"artifacts": [
        {"kind": "plan", "path": "seg-plan.json"},
        {"kind": "segmentation", "path": "seg1.npz", "round": 1, "parent_kind": "plan"}]}, {"A": 5}, tmp_path)
    assert [(v.id, v.parent_id, v.plan_id) for v in seg] == [(3, 2, 2), (4, 3, 3)]
    assert [v.label for v in registry.lineage("v4")] == ["v4", "v3", "v2", "v1"]
    assert [t.version.id for t in registry.touched_by("B")] == [1, 2, 3, 4]


def test_lineage_lists_exactly_the_contributing_sites_with_their_fingerprints(history: Registry) -> None:
    chain = history.lineage("v5")
    assert [x.label for x in chain] == ["v5", "v4", "v3", "v2", "v1"]
    assert {s.site_id for x in chain for s in x.sites} == {"A", "B", "C", "E"}  # C evaluated v5 but only fed v1
    assert chain[0].site_ids == ("A", "B") and chain[1].site_ids == ("A", "B", "E")
    a = {x.label: next(s for s in x.sites if s.site_id == "A") for x in chain}
    assert {s.manifest_hash for s in a.values()} == {MANIFEST["A"]}  # inherited from the run's fingerprint
    assert a["v1"].n_cases == 5 and a["v1"].manifest_cases == 6
    assert next(s for s in chain[1].sites if s.site_id == "E").manifest_hash is None  # E sent no fingerprint
    chain2 = history.lineage(7)
    assert [x.label for x in chain2] == ["v7", "v6"]
    assert {s.site_id: s.manifest_hash for s in chain2[0].sites} == MANIFEST_RUN2
    assert chain2[0].sites[0].n_cases == 7


@pytest.mark.parametrize(("site", "expected"), [
    ("A", {1: (True, ()), 2: (True, (1,)), 3: (True, (1, 2)), 4: (True, (1, 2, 3)), 5: (True, (1, 2, 3, 4)),
           6: (True, ()), 7: (True, (6,))}),
    ("C", {1: (True, ()), 2: (False, (1,)), 3: (False, (1,)), 4: (False, (1,)), 5: (False, (1,))}),
    ("E", {4: (True, ()), 5: (False, (4,))}),
    ("D", {}),
])
def test_touched_by_is_exact(history: Registry, site: str, expected: dict) -> None:
    got = {t.version.id: (t.direct, t.via) for t in history.touched_by(site)}
    assert got == expected


def test_version_references(history: Registry) -> None:
    v5 = history.version("v5")
    assert history.version(5) == v5 == history.version("V5") == history.version(v5.artifact_sha256[:10])
    assert history.version("sha256:" + v5.artifact_sha256) == v5
    with pytest.raises(UnknownVersionError, match=r"no model version 'v99'.*7 version\(s\).*registry list"):
        history.version("v99")
    with pytest.raises(UnknownVersionError, match="no model version 'best'"):
        history.lineage("best")
    with pytest.raises(UnknownVersionError, match="deadbeefdeadbeef"):
        history.version("deadbeefdeadbeef")
    assert history.versions(kind="classifier", site="E") == [history.version(4)]
