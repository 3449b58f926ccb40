"""``fedbiopsy preprocess``: a cohort in parallel, failing cases reported and skipped, a valid site out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from typer.testing import CliRunner

from cli.main import app
from client.preprocessing.foreground import foreground_mask, values_in
from client.steps.preprocessing import nyul_landmarks_step
from common.config import load_study_config
from common.hashing import sha256_file
from common.imageio import write_image
from common.nyul import aggregate_nyul
from common.plan import build_plan, load_plan, write_plan
from common.validation import load_site, validate_site

runner = CliRunner()


def _break_cases(site: Path) -> tuple[str, str]:
    """One case that validation rejects (no CET1) and one that fails inside the pipeline (a blank CET1)."""
    ids = sorted(p.name for p in (site / "images").iterdir())
    invalid, blank = ids[0], ids[1]
    (site / "images" / invalid / "CET1.nii.gz").unlink()
    path = site / "images" / blank / "CET1.nii.gz"
    img = sitk.ReadImage(str(path))
    zeros = sitk.Image(img.GetSize(), sitk.sitkFloat32)
    zeros.CopyInformation(img)
    write_image(zeros, path)
    return invalid, blank


def test_preprocess_cli_two_workers_skips_failing_cases_and_writes_a_valid_site(writable_sites: list[Path],
                                                                                tmp_path: Path) -> None:
    site = writable_sites[1]  # the 1.5T scanner: noise, bias field, anisotropic voxels
    invalid, blank = _break_cases(site)
    out = tmp_path / "pre"
    result = runner.invoke(app, ["preprocess", str(site), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 1, result.output  # some cases failed, the rest completed
    assert blank in result.output and "no foreground" in result.output
    assert invalid in result.output and "CET1 is missing" in result.output

    report = validate_site(out)
    assert report.valid, [str(p) for c in report.cases for p in c.problems]
    done = sorted(c.patient_id for c in report.cases)
    assert len(done) == 4 and invalid not in done and blank not in done
    summary = json.loads((out / "preprocessing.json").read_text())
    assert set(summary["failed"]) == {invalid, blank} and summary["workers"] == 2
    plan = load_plan(out / "plan.json")
    assert plan.site_local and plan.nyul is not None and summary["plan_sha256"] == sha256_file(out / "plan.json")
    for pid in done:
        hist_path = out / "histories" / f"{pid}.json"
        assert summary["cases"][pid]["history_sha256"] == sha256_file(hist_path)
        hist = json.loads(hist_path.read_text())
        assert [s["step"] for s in hist["steps"]] == ["denoise", "bias", "register", "resample", "nyul"]
        assert hist["plan_sha256"] == summary["plan_sha256"]
        assert hist["outputs"]["T2w"]["sha256"] == sha256_file(out / "images" / pid / "T2w.nii.gz")
        t2 = sitk.ReadImage(str(out / "images" / pid / "T2w.nii.gz"))
        assert np.allclose(t2.GetSpacing(), plan.target_spacing)
        # each case's own foreground landmarks now sit on the standard scale
        own = np.percentile(values_in(t2, foreground_mask(t2)), plan.nyul.percentiles)
        assert np.abs(own - np.asarray(plan.nyul.landmarks["T2w"]))[1:-1].max() < 3.0  # of a 0-100 scale
    assert not (out / "histories" / f"{blank}.json").exists() and not (out / "images" / blank).exists()


def test_preprocess_with_the_federated_plan_runs_one_pass_and_checks_the_settings(small_sites: list[Path],
                                                                                  tmp_path: Path) -> None:
    config = tmp_path / "study.yaml"
    config.write_text("preprocessing: {steps: [resample, normalise]}\n")
    study = load_study_config(config)
    replies = {}
    for site_dir in small_sites:
        site = load_site(site_dir)
        replies[site.site_id] = nyul_landmarks_step(site, study, {"target_spacing": np.array([1.1, 1.1, 1.3])})
    plan = build_plan(study, (1.1, 1.1, 1.3), aggregate_nyul(replies, study.sequences),
                      {s: 6 for s in replies})
    sha = write_plan(plan, tmp_path / "plan.json")
    out = tmp_path / "pre"
    result = runner.invoke(app, ["preprocess", str(small_sites[2]), "--out", str(out), "--config", str(config),
                                 "--plan", str(tmp_path / "plan.json"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "federated plan" in result.output
    assert load_plan(out / "plan.json").sha256 == sha
    hist = json.loads(next((out / "histories").glob("*.json")).read_text())
    assert hist["plan_sha256"] == sha and [s["step"] for s in hist["steps"]] == ["resample", "nyul"]
    assert hist["steps"][1]["args"]["landmarks"]["CET1"] == list(plan.nyul.landmarks["CET1"])
    # a plan built with other settings than the study's is refused, naming the fix
    other = tmp_path / "other.yaml"
    other.write_text("preprocessing: {steps: [normalise]}\n")
    result = runner.invoke(app, ["preprocess", str(small_sites[2]), "--out", str(tmp_path / "x"), "--config",
                                 str(other), "--plan", str(tmp_path / "plan.json")])
    assert result.exit_code == 2 and "other preprocessing settings" in result.output
