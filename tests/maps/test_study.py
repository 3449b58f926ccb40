"""A study over T2w, CET1, DWI and DCE in Flower's simulation engine: the maps are channels from the fingerprint
to the signature, resampled but never normalised, harmonised by ComBat, and shown in the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from common.config import load_study_config
from common.maps.habitats import habitat_names
from simulations.engine import run_simulated_study

PHASES = ["fingerprint", "preprocessing", "features", "harmonisation", "reduction", "report"]


@pytest.fixture(scope="module")
def mp_study(mp_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[Path], Path]:
    root = tmp_path_factory.mktemp("mp-study")
    sites = []
    for src in mp_sites:
        shutil.copytree(src, root / src.name)
        sites.append(root / src.name)
    raw = yaml.safe_load((Path("common/studies/multiparametric.yaml")).read_text())
    raw["phases"] = PHASES
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = run_simulated_study(load_study_config(path), path, sites, root / "result")
    return out["outputs"], sites, root / "result"


@pytest.mark.slow
def test_maps_run_through_the_pipeline(mp_study) -> None:
    outputs, sites, result = mp_study
    assert set(outputs["fingerprint"]["intensity"]) == {"T2w", "CET1", "ADC", "Ktrans", "ve"}
    assert set(outputs["preprocessing"]["effect"]["spread"]) == {"T2w", "CET1"}  # maps are not normalised
    target = outputs["fingerprint"]["target_spacing"]
    site = sites[1]
    pre = site / "derived" / "preprocessed"
    pid = sorted(p.name for p in (pre / "images").iterdir())[0]
    adc_pre = sitk.ReadImage(str(pre / "images" / pid / "ADC.nii.gz"))
    assert np.allclose(adc_pre.GetSpacing(), target, atol=1e-4)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(pre / "masks" / f"{pid}.nii.gz"))) > 0
    raw_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(site / "masks" / f"{pid}.nii.gz"))) > 0
    raw_adc = sitk.GetArrayFromImage(sitk.ReadImage(str(site / "derived" / "maps" / pid / "ADC.nii.gz")))
    on_grid = float(np.median(sitk.GetArrayFromImage(adc_pre)[mask]))
    # mm2/s, not Nyúl units (the resampled mask shifts the median by partial volume at the rim)
    assert on_grid == pytest.approx(float(np.median(raw_adc[raw_mask])), rel=0.2)
    assert 3e-4 < on_grid < 3e-3


@pytest.mark.slow
def test_maps_are_features_harmonised_and_in_the_signature(mp_study) -> None:
    outputs, sites, result = mp_study
    derived = sites[0] / "derived"
    raw = pd.read_csv(derived / "features.csv", index_col="patient_id")
    harmonised = pd.read_csv(derived / "features_harmonised.csv", index_col="patient_id")
    for name in ("ADC_original_firstorder_Median", "Ktrans_original_firstorder_Median", "ve_original_glcm_Idm"):
        assert name in raw.columns and name in harmonised.columns
    assert not np.allclose(raw["ADC_original_firstorder_Median"], harmonised["ADC_original_firstorder_Median"])
    habitats = list(habitat_names("ADC", "Ktrans"))
    np.testing.assert_allclose(raw[habitats].sum(axis=1), 1.0)
    pd.testing.assert_frame_equal(raw[habitats], harmonised[habitats])  # copied past ComBat
    kept = outputs["reduction"]["kept"]
    for channel in ("ADC", "Ktrans"):
        assert any(k.startswith(f"{channel}_") for k in kept), channel
    html = Path(outputs["report"]["report"]).read_text(encoding="utf-8")
    assert "ADC_original_firstorder_Median" in html and "Ktrans_original_firstorder_Median" in html
    assert "parametric map" in html
    assert (result / "report" / "features_combat.png").is_file()
    summary = json.loads((sites[0] / "derived" / "features.json").read_text())
    assert summary["habitats"] == {"maps": ["ADC", "Ktrans"], "thresholds": [1.2e-3, 0.1]}
