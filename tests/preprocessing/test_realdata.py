"""Real MRI: pyradiomics 3.0.1's brain1 (T1 brain MRI with a tumour label) through the whole pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from client.preprocessing.cohort import preprocess_site
from client.preprocessing.foreground import foreground_mask, values_in
from common.config import load_study_config
from common.plan import load_plan
from common.sitedata import Scanner, SiteConfig, SitePolicy, write_site_config
from common.validation import validate_site


@pytest.fixture(scope="module")
def brain_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-case site holding brain1 (skipped, with the reason, only when the archive cannot be had)."""
    from simulations.realdata import pyradiomics_data

    data, reason = pyradiomics_data()
    if data is None:
        pytest.skip(f"pyradiomics 3.0.1 brain MRI unavailable: {reason}")
    site = tmp_path_factory.mktemp("brain") / "brain-site"
    (site / "images" / "brain1").mkdir(parents=True)
    (site / "masks").mkdir()
    shutil.copy(data / "brain1_image.nrrd", site / "images" / "brain1" / "T1w.nrrd")
    shutil.copy(data / "brain1_label.nrrd", site / "masks" / "brain1.nrrd")
    write_site_config(SiteConfig(site_id="pyradiomics", scanner=Scanner(vendor="unknown", field_strength=1.5),
                                 sequences=("T1w",), reference_sequence="T1w", policy=SitePolicy(min_cohort=1)), site)
    pd.DataFrame([{"patient_id": "brain1", "age": None, "sex": None, "label": 1, "os_days": None,
                   "os_event": None}]).to_csv(site / "clinical.csv", index=False)
    return site


def test_whole_pipeline_on_real_brain_mri(brain_site: Path, tmp_path: Path) -> None:
    src_img = sitk.ReadImage(str(brain_site / "images" / "brain1" / "T1w.nrrd"))  # 256 x 256 x 25, 0.78 x 0.78 x 6.5
    src_mask = sitk.ReadImage(str(brain_site / "masks" / "brain1.nrrd"))
    study = load_study_config(None, sequences=["T1w"], reference_sequence="T1w",
                              preprocessing={"resample": {"target_spacing": [1.5, 1.5, 3.0]},
                                             "bias": {"shrink_factor": 8, "iterations": [30, 20]}})  # fast
    report = preprocess_site(brain_site, tmp_path / "out", study, workers=1)
    assert not report.failed and list(report.completed) == ["brain1"]
    assert validate_site(tmp_path / "out").valid
    img = sitk.ReadImage(str(tmp_path / "out" / "images" / "brain1" / "T1w.nii.gz"))
    mask = sitk.ReadImage(str(tmp_path / "out" / "masks" / "brain1.nii.gz"))
    assert np.allclose(img.GetSpacing(), (1.5, 1.5, 3.0)) and np.allclose(mask.GetSpacing(), img.GetSpacing())
    assert np.allclose(img.GetDirection(), src_img.GetDirection())  # the scanner's orientation is kept
    # the tumour mask: still binary, same volume (within 5 %) and same place (within one output voxel)
    m = sitk.GetArrayFromImage(mask)
    assert set(np.unique(m).tolist()) == {0, 1}
    vol = lambda im: float((sitk.GetArrayViewFromImage(im) > 0).sum() * np.prod(im.GetSpacing()))  # noqa: E731
    assert abs(vol(mask) / vol(src_mask) - 1.0) < 0.05
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(src_mask > 0, sitk.sitkUInt8))
    c_src = np.asarray(stats.GetCentroid(1))
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    assert np.linalg.norm(np.asarray(stats.GetCentroid(1)) - c_src) < 1.5
    # Nyúl: the case's own foreground landmarks land on the (site-local) standard scale
    plan = load_plan(tmp_path / "out" / "plan.json")
    own = np.percentile(values_in(img, foreground_mask(img)), plan.nyul.percentiles)
    assert np.abs(own - np.asarray(plan.nyul.landmarks["T1w"]))[1:-1].max() < 3.0
    # the tumour keeps its contrast against the rest of the head (a monotone intensity chain)
    fg_src = foreground_mask(src_img)
    before = np.median(values_in(src_img, src_mask)) - np.median(values_in(src_img, fg_src))
    after = np.median(values_in(img, mask)) - np.median(values_in(img, foreground_mask(img)))
    assert np.sign(before) == np.sign(after) != 0
    hist = json.loads((tmp_path / "out" / "histories" / "brain1.json").read_text())
    assert [s["step"] for s in hist["steps"]] == ["denoise", "bias", "register", "resample", "nyul"]
    assert hist["steps"][1]["details"]["T1w"]["shrink"] == [8, 8, 1]  # 25 slices are not shrunk through
