"""A site's radiomics table: deterministic in the number of workers, failing cases listed with their reason,
the `fedbiopsy extract` command, and the site step that keeps the table at the site."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from client.features.table import extract_cases, feature_provenance, read_feature_table
from client.steps.features import SETTINGS_KEY, SPACING_KEY, features_path, features_step
from common.config import load_study_config
from common.errors import PolicyError
from common.features.settings import load_radiomics_settings, settings_hash
from common.validation import load_site

SPACING = (1.2, 1.2, 1.2)


def test_single_process_and_parallel_give_exactly_the_same_table(small_sites: list[Path]) -> None:
    site = load_site(small_sites[1])
    settings = load_radiomics_settings()
    serial = extract_cases(site.cases, ("T2w", "CET1"), settings, SPACING, workers=1)
    parallel = extract_cases(site.cases, ("T2w", "CET1"), settings, SPACING, workers=2)
    pd.testing.assert_frame_equal(serial.frame, parallel.frame, check_exact=True)
    assert serial.frame.shape == (6, 214) and not serial.failures
    assert list(serial.frame.index) == sorted(c.patient_id for c in site.cases)
    cols = list(serial.frame.columns)
    assert cols[:107] == [c for c in cols if c.startswith("T2w_original_")]
    assert cols[107:] == [c for c in cols if c.startswith("CET1_original_")]
    assert serial.frame.notna().all().all()
    # the sequences differ, so their columns do too
    assert not np.allclose(serial.frame[cols[107:]].to_numpy(), serial.frame[cols[:107]].to_numpy())
    assert serial.settings_hash == settings_hash(settings.resolve(("T2w", "CET1"), SPACING))


def _break_cases(site_dir: Path) -> dict[str, str]:
    """Three broken cases of a site: label missing, one-voxel ROI, no mask. Returns pid -> expected reason."""
    masks = site_dir / "masks"
    pids = sorted(p.name for p in (site_dir / "images").iterdir())
    wrong_label = sitk.ReadImage(str(masks / f"{pids[0]}.nii.gz"))
    sitk.WriteImage(wrong_label * 2, str(masks / f"{pids[0]}.nii.gz"))  # tumour saved as label 2
    tiny = sitk.ReadImage(str(masks / f"{pids[1]}.nii.gz"))
    arr = np.zeros(sitk.GetArrayFromImage(tiny).shape, np.uint8)
    arr[10, 10, 10] = 1
    one = sitk.GetImageFromArray(arr)
    one.CopyInformation(tiny)
    sitk.WriteImage(one, str(masks / f"{pids[1]}.nii.gz"))
    (masks / f"{pids[2]}.nii.gz").unlink()
    return {pids[0]: "Label (1) not present", pids[1]: "voxel", pids[2]: "no tumour mask"}


def test_extract_command_lists_failing_cases_and_completes_the_others(writable_sites: list[Path],
                                                                       tmp_path: Path) -> None:
    from cli.main import app

    site_dir = writable_sites[0]
    expected = _break_cases(site_dir)
    out = tmp_path / "features.csv"
    result = CliRunner().invoke(app, ["extract", str(site_dir), "--out", str(out), "--workers", "2",
                                      "--spacing", "1.2,1.2,1.2"], terminal_width=200)
    assert result.exit_code == 1, result.output  # some cases failed, the table is still written
    for pid in expected:
        assert pid in result.output
    table = read_feature_table(out)
    provenance = feature_provenance(out)
    assert sorted(provenance["failures"]) == sorted(expected)
    for pid, reason in expected.items():
        assert reason in provenance["failures"][pid]
    assert len(table) == 3 and table.shape[1] == 214 and not set(expected) & set(table.index)
    settings = load_radiomics_settings()
    assert provenance["settings_hash"] == settings_hash(settings.resolve(("T2w", "CET1"), SPACING))
    # the CSV holds the exact values of an in-process extraction of the intact cases
    site = load_site(site_dir)
    direct = extract_cases([c for c in site.cases if c.patient_id not in expected], ("T2w", "CET1"), settings,
                           SPACING, workers=1)
    pd.testing.assert_frame_equal(table, direct.frame, check_exact=True)


def test_site_step_keeps_the_table_at_the_site_and_replies_counts_only(writable_sites: list[Path]) -> None:
    site = load_site(writable_sites[2])
    study = load_study_config(features={"settings": "default", "workers": 1}, phases=("fingerprint", "features"))
    reply = features_step(site, study, {SPACING_KEY: np.array(SPACING)})
    assert set(reply) == {"n_cases", "n_features", "n_failed", "settings_hash"}
    assert all(np.ndim(v) == 0 for v in reply.values())  # no patient-level row in the reply
    assert (reply["n_cases"], reply["n_features"], reply["n_failed"]) == (6, 214, 0)
    path = features_path(site)
    assert path == site.root / "derived" / "features.csv"
    table = read_feature_table(path)
    assert list(table.index) == sorted(c.patient_id for c in site.cases)
    assert json.loads(path.with_suffix(".json").read_text())["settings_hash"] == reply["settings_hash"]
    # the server's copy of the settings wins over the site's, and changes the hash
    custom = load_radiomics_settings().model_copy(update={"setting": {
        **load_radiomics_settings().setting, "binWidth": 40}, "sequences": {}})
    other = features_step(site, study, {SPACING_KEY: np.array(SPACING),
                                        SETTINGS_KEY: json.dumps(custom.model_dump(mode="json"))})
    assert other["settings_hash"] != reply["settings_hash"]
    assert read_feature_table(path)["T2w_original_glcm_JointEnergy"].ne(table["T2w_original_glcm_JointEnergy"]).all()


def test_site_step_refuses_below_min_cohort(writable_sites: list[Path]) -> None:
    site_dir = writable_sites[1]
    _break_cases(site_dir)  # 3 of 6 cases fail; the policy needs 5
    site = load_site(site_dir)
    study = load_study_config(features={"settings": "default", "workers": 1}, phases=("fingerprint", "features"))
    with pytest.raises(PolicyError, match="min_cohort"):
        features_step(site, study, {SPACING_KEY: np.array(SPACING)})
