"""The fingerprint phase: exact aggregates, no per-patient values, policy refusals, through Flower."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from client.steps.fingerprint import fingerprint_step
from common.config import load_study_config
from common.errors import PolicyError
from common.fingerprint import CaseMeasure, aggregate_fingerprints, site_fingerprint
from common.validation import load_site


def _cases(rng: np.random.Generator, n: int, spacing: tuple) -> list[CaseMeasure]:
    return [CaseMeasure(spacing, (64, 64, 40), {"T2w": rng.normal(500, 80, size=int(rng.integers(50, 200)))})
            for _ in range(n)]


def test_merge_is_exact_for_moments_and_weighted_for_quantiles() -> None:
    rng = np.random.default_rng(0)
    sites = {"a": _cases(rng, 5, (1.0, 1.0, 1.5)), "b": _cases(rng, 9, (0.8, 0.8, 3.0)), "c": _cases(rng, 6, (1, 1, 1))}
    replies = {s: site_fingerprint(s, c, ["T2w"], [5, 50, 95], min_cohort=5) for s, c in sites.items()}
    merged = aggregate_fingerprints(replies, ["T2w"])
    pooled = np.concatenate([c.foreground["T2w"] for cs in sites.values() for c in cs])
    t2 = merged["intensity"]["T2w"]
    assert t2["n_voxels"] == pooled.size
    assert t2["mean"] == pytest.approx(pooled.mean(), rel=1e-12)
    assert t2["std"] == pytest.approx(pooled.std(ddof=1), rel=1e-9)
    assert (t2["min"], t2["max"]) == (pooled.min(), pooled.max())
    spacings = np.array([c.spacing for cs in sites.values() for c in cs])
    np.testing.assert_allclose(merged["spacing_mean"], spacings.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(merged["spacing_median"], (5 * np.array([1, 1, 1.5]) + 9 * np.array([0.8, 0.8, 3])
                                                          + 6 * np.ones(3)) / 20, rtol=1e-12)
    assert merged["cases_per_site"] == {"a": 5, "b": 9, "c": 6} and merged["n_cases"] == 20


def test_reply_holds_aggregates_only(small_sites) -> None:
    study = load_study_config()
    site = load_site(small_sites[0])
    full = fingerprint_step(site, study, {})
    fewer = fingerprint_step(type(site)(site.root, site.config, site.cases[:5]), study, {})
    # The same fields of the same shapes whatever the cohort size: nothing scales with the number of patients.
    assert full.keys() == fewer.keys()
    for key, value in full.items():
        assert np.shape(value) == np.shape(fewer[key]), key
        assert max(np.shape(value), default=0) <= len(study.fingerprint.percentiles), key
    # No patient identifier, and no single case's foreground sample appears as is.
    text = repr(full)
    assert not any(c.patient_id in text for c in site.cases)
    assert full["n_cases"] == 6 and full["T2w/n"] == sum(
        min(study.fingerprint.foreground_samples_per_case, int(_mask_voxels(c))) for c in site.cases)
    with pytest.raises(PolicyError, match="min_cohort"):
        fingerprint_step(type(site)(site.root, site.config, site.cases[:4]), study, {})


def _mask_voxels(case) -> int:
    import SimpleITK as sitk

    return int(sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))).sum())


def test_fingerprint_phase_through_flower_simulation(writable_sites, tmp_path) -> None:
    from simulations.engine import run_simulated_study

    # One hospital does not allow the fingerprint phase: it answers an error naming the rule; the study goes on.
    refusing = writable_sites[2]
    cfg = yaml.safe_load((refusing / "site.yaml").read_text())
    cfg["policy"]["allowed_phases"] = ["segmentation"]
    (refusing / "site.yaml").write_text(yaml.safe_dump(cfg))
    study_path = tmp_path / "study.yaml"
    study_path.write_text("name: fp-test\nphases: [fingerprint]\nmin_sites: 2\nround_timeout_s: 120\n")
    study = load_study_config(study_path)
    summary = run_simulated_study(study, study_path, writable_sites, tmp_path / "out")
    fp = summary["outputs"]["fingerprint"]
    assert fp["cases_per_site"] == {"site-001": 6, "site-002": 6}
    assert fp["n_cases"] == 12 and fp["n_sites"] == 2
    [reason] = fp["refused"].values()
    assert "site-003" in reason and "allowed_phases" in reason
    # The federated merge equals the merge of the same site steps run without Flower.
    direct = {s.site_id: fingerprint_step(s, study, {}) for s in map(load_site, writable_sites[:2])}
    expected = aggregate_fingerprints(direct, study.sequences)
    assert fp["intensity"]["T2w"]["mean"] == pytest.approx(expected["intensity"]["T2w"]["mean"], rel=1e-12)
    assert fp["target_spacing"] == pytest.approx(expected["target_spacing"], rel=1e-12)
    assert (tmp_path / "out" / "fingerprint.json").is_file()
