"""The study registers itself: a simulated study through Flower's simulation engine, and the site manifests."""

from __future__ import annotations

from pathlib import Path

import yaml

from client.steps.fingerprint import manifest_hash
from common.config import StudyConfig, load_study_config
from common.fingerprint import case_manifest_hash
from common.sitedata import load_site_config, write_site_config
from common.validation import load_site
from server.registry import open_registry


def test_case_manifest_hash_pins_the_data_and_nothing_else() -> None:
    files = {"p2": {"T2w": "1" * 64, "mask": "2" * 64}, "p1": {"T2w": "3" * 64, "mask": "4" * 64}}
    extra = {"clinical.csv": "5" * 64}
    h = case_manifest_hash(files, extra)
    assert h == case_manifest_hash({k: dict(reversed(v.items())) for k, v in reversed(files.items())}, extra)
    assert len(h) == 64 and "p1" not in h
    variants = [
        case_manifest_hash({**files, "p1": {"T2w": "3" * 64, "mask": "6" * 64}}, extra),  # one file changed
        case_manifest_hash({"p2": files["p2"]}, extra),  # one case withdrawn
        case_manifest_hash({"p3" if k == "p1" else k: v for k, v in files.items()}, extra),  # one id changed
        case_manifest_hash(files, {"clinical.csv": "7" * 64}),  # the clinical table changed
    ]
    assert len({h, *variants}) == 5


def test_site_manifest_follows_the_site_files(writable_sites: list[Path]) -> None:
    site_dir = writable_sites[0]
    before = manifest_hash(load_site(site_dir))
    assert manifest_hash(load_site(site_dir)) == before
    clinical = site_dir / "clinical.csv"
    clinical.write_text(clinical.read_text().replace(",0,", ",1,", 1))
    assert manifest_hash(load_site(site_dir)) != before


def test_simulated_study_registers_exactly_the_sites_that_took_part(writable_sites: list[Path],
                                                                    tmp_path: Path) -> None:
    # Prepare: the third hospital's policy refuses the fingerprint phase
    refusing = writable_sites[2]
    cfg = load_site_config(refusing)
    write_site_config(cfg.model_copy(update={"policy": cfg.policy.model_copy(
        update={"allowed_phases": ("segmentation",)})}), refusing)
    study_path = tmp_path / "study.yaml"
    raw = StudyConfig(name="registry-e2e", phases=("fingerprint",), min_sites=2).model_dump(mode="json")
    study_path.write_text(yaml.safe_dump(raw))
    study = load_study_config(study_path)
    from simulations.engine import run_simulated_study

    # Execute
    summary = run_simulated_study(study, study_path, writable_sites, tmp_path / "results" / "study")

    # Assert: one plan version whose lineage holds the two sites that answered, with their data fingerprints
    took_part = {load_site_config(d).site_id: load_site(d) for d in writable_sites[:2]}
    assert summary["registry"]["versions"] == ["v1"] and summary["registry"]["run_id"] == 1
    head = summary["registry"]["head"]  # published outside the database after the run's last event
    assert (tmp_path / "results" / "study" / "registry-head.txt").read_text().strip() == head
    with open_registry(tmp_path / "results" / "registry", create=False) as reg:  # the default location
        assert head == f"{reg.head()[0]}:{reg.head()[1]}" and reg.verify(expected_head=head).ok
        (plan,) = reg.versions()
        lineage = reg.lineage(plan.label)
        assert [v.kind for v in lineage] == ["plan"] and plan.phase == "fingerprint"
        assert {s.site_id for v in lineage for s in v.sites} == set(took_part)
        for s in plan.sites:
            site = took_part[s.site_id]
            assert s.manifest_hash == manifest_hash(site) and s.manifest_cases == len(site.cases)
            assert s.n_cases == sum(c.mask is not None for c in site.cases)
        assert reg.touched_by(cfg.site_id) == []
        assert reg.artifact_bytes(plan.label) == (tmp_path / "results" / "study" / "plan.json").read_bytes()
        assert plan.study_hash == study.hash and plan.code_version != "unknown"
        assert [e.kind for e in reg.events()] == ["registry.created", "study.recorded", "run.started",
                                                  "phase.recorded", "version.registered", "run.finished"]
        assert reg.verify().ok
    # no patient identifier anywhere in the registry: database and artifacts
    stored = b"".join(p.read_bytes() for p in (tmp_path / "results" / "registry").rglob("*") if p.is_file())
    ids = [c.patient_id for site in took_part.values() for c in site.cases]
    assert all(site_id.encode() in stored for site_id in took_part)  # the search does see stored text
    assert len(ids) == 12 and not any(pid.encode() in stored for pid in ids)
