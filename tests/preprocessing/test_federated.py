"""The preprocessing phase through Flower's simulation engine: fingerprint -> plan (target spacing, federated
Nyúl landmarks) -> a "plan" artifact, stored at every site."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.steps.preprocessing import PLAN_FILE, nyul_landmarks_step
from common.config import load_study_config
from common.errors import PolicyError
from common.hashing import sha256_file
from common.nyul import aggregate_nyul
from common.plan import load_plan, settings_hash
from common.validation import load_site, validate_site


def test_site_step_refuses_below_min_cohort_and_replies_aggregates_only(small_sites: list[Path]) -> None:
    study = load_study_config(None, preprocessing={"steps": ["normalise"]})
    site = load_site(small_sites[0])
    reply = nyul_landmarks_step(site, study, {})
    k = len(study.preprocessing.normalise.nyul_percentiles)
    assert reply["n_cases"] == 6
    assert {key for key, v in reply.items() if isinstance(v, np.ndarray) and v.size == k} == \
        {"percentiles", "T2w/landmarks", "CET1/landmarks"}
    assert set(reply) == {"n_cases", "percentiles", "scale", "T2w/landmarks", "CET1/landmarks"}
    few = type(site)(site.root, site.config.model_copy(update={"policy": site.config.policy.model_copy(
        update={"min_cohort": 7})}), site.cases)
    with pytest.raises(PolicyError, match="min_cohort"):
        nyul_landmarks_step(few, study, {})


@pytest.mark.slow
def test_preprocessing_phase_through_flower_simulation(writable_sites: list[Path], tmp_path: Path) -> None:
    from simulations.engine import run_simulated_study

    study_path = tmp_path / "study.yaml"
    study_path.write_text("name: preprocessing-test\nphases: [fingerprint, preprocessing]\nmin_sites: 3\n"
                          "round_timeout_s: 300\npreprocessing: {steps: [resample, normalise]}\n")
    study = load_study_config(study_path)
    summary = run_simulated_study(study, study_path, writable_sites, tmp_path / "out")
    spacing = summary["outputs"]["fingerprint"]["target_spacing"]
    out = summary["outputs"]["preprocessing"]
    plan_path = Path(out["artifacts"][0]["path"])
    plan = load_plan(plan_path)
    assert plan.target_spacing == pytest.approx(spacing) and not plan.site_local
    assert out["artifacts"][0]["kind"] == "plan" and out["artifacts"][0]["round"] is None
    assert out["artifacts"][0]["settings_hash"] == settings_hash(study.preprocessing) == plan.settings_hash
    assert out["plan_sha256"] == sha256_file(plan_path) == plan.sha256
    assert summary["participants"]["preprocessing"] == {"site-001": 6, "site-002": 6, "site-003": 6}
    # the same landmarks as the site step and the server step run in-process
    replies = {}
    for site_dir in writable_sites:
        site = load_site(site_dir)
        replies[site.site_id] = nyul_landmarks_step(site, study, {"target_spacing": np.asarray(spacing)})
    expected = aggregate_nyul(replies, study.sequences)["landmarks"]
    for seq in study.sequences:
        assert np.allclose(plan.nyul.landmarks[seq], expected[seq], rtol=0, atol=1e-9)
    # every site stored the very plan the server wrote
    assert out["delivered_to"] == ["site-001", "site-002", "site-003"]
    for site_dir in writable_sites:
        assert sha256_file(site_dir / "derived" / PLAN_FILE) == out["plan_sha256"]
    # the sites preprocessed their cohorts with it: valid site folders, and the site effect on intensities shrank
    effect = out["effect"]
    assert effect["cases_per_site"] == {"site-001": 6, "site-002": 6, "site-003": 6}
    for site_dir in writable_sites:
        assert validate_site(site_dir / "derived" / "preprocessed").valid
    for seq in study.sequences:
        assert effect["spread"][seq]["shrink"] > 5.0, effect["spread"]
    assert Path(effect["figures"]["histograms"]).stat().st_size > 10_000


def test_phase_needs_the_fingerprint_target_spacing(tmp_path: Path) -> None:
    from common.errors import ConfigError
    from server.phases.base import PhaseContext
    from server.phases.preprocessing import run

    ctx = PhaseContext(federation=None, study=load_study_config(), result_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="list `fingerprint` before `preprocessing`"):
        run(ctx)
