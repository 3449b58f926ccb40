"""The imaging phases read the preprocessed cases on the plan's grid (client/steps/inputs.py), never the raw ones
when the study preprocesses, and refuse a missing or foreign preprocessed folder; masks predicted on the grid go
back onto the site's native grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from client.preprocessing.cohort import preprocess_site
from client.steps.inference import native_mask
from client.steps.inputs import check_plan_grid, load_imaging_inputs, preprocessed_dir
from common.config import StudyConfig
from common.errors import ProtocolError, SiteDataError
from common.imageio import read_image
from common.plan import build_plan, write_plan
from common.validation import load_site
from simulations.phantoms import simulate_sites

SPACING = (1.3, 1.3, 1.5)  # x, y, z mm: coarser than the site's 1.0 mm, so every case is resampled


def _study(**overrides: object) -> StudyConfig:
    base: dict = {"name": "chain", "phases": ["fingerprint", "preprocessing", "segmentation", "features"],
                  "preprocessing": {"steps": ["resample", "normalise"], "normalise": {"method": "zscore"}},
                  "features": {"workers": 1}}
    base.update(overrides)
    return StudyConfig.model_validate(base)


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One simulated site, preprocessed with a plan of this study as the preprocessing phase leaves it."""
    root = simulate_sites(tmp_path_factory.mktemp("chain"), sites=1, patients=6, size=32, seed=3, unlabelled=1)[0]
    study = _study()
    plan = build_plan(study, SPACING, None, {"site-001": 6})
    write_plan(plan, root / "derived" / "plan.json")  # what preprocessing_plan stores
    preprocess_site(root, preprocessed_dir(load_site(root)), study, plan=plan, workers=1)
    return root


def test_the_imaging_inputs_are_the_preprocessed_cases_on_the_plans_grid(site_dir: Path) -> None:
    site = load_site(site_dir)
    inputs = load_imaging_inputs(site, _study())
    assert inputs.kind == "preprocessed" and inputs.grid_spacing == pytest.approx(SPACING)
    assert inputs.site.root == site.root and inputs.site.config == site.config  # policy and ledgers: the site's
    assert [c.patient_id for c in inputs.site.cases] == [c.patient_id for c in site.cases]
    for raw, case in zip(site.cases, inputs.site.cases, strict=True):
        assert (case.mask is None) == (raw.mask is None) and case.clinical == raw.clinical
        for path in [*case.images.values(), *([case.mask] if case.mask else [])]:
            assert preprocessed_dir(site) in Path(path).parents
            assert read_image(path).GetSpacing() == pytest.approx(SPACING, abs=1e-5)
    check_plan_grid(inputs, list(reversed(SPACING)))  # the segmentation plan on that grid (z, y, x) passes
    with pytest.raises(ProtocolError, match="target spacing"):
        check_plan_grid(inputs, [1.0, 1.0, 1.0])  # a plan for another grid is refused


def test_a_study_without_the_preprocessing_phase_reads_the_raw_cases(site_dir: Path) -> None:
    site = load_site(site_dir)
    inputs = load_imaging_inputs(site, _study(phases=["fingerprint", "segmentation"]))
    assert inputs.kind == "raw" and inputs.grid_spacing is None and inputs.site is site
    check_plan_grid(inputs, [1.0, 1.0, 1.0])  # native grids: nothing to match


def test_a_missing_or_foreign_preprocessed_folder_is_refused_never_replaced_by_raw(site_dir: Path,
                                                                                  tmp_path: Path) -> None:
    site = load_site(site_dir)
    with pytest.raises(SiteDataError, match="another study") as err:
        load_imaging_inputs(site, _study(name="another"))  # the stored plan is of the study "chain"
    assert "preprocessing phase" in str(err.value)
    bare = simulate_sites(tmp_path, sites=1, patients=6, size=24, seed=4)[0]
    with pytest.raises(SiteDataError, match="no plan"):
        load_imaging_inputs(load_site(bare), _study())
    write_plan(build_plan(_study(), SPACING, None, {}), bare / "derived" / "plan.json")
    with pytest.raises(SiteDataError, match="preprocessed cases are missing"):
        load_imaging_inputs(load_site(bare), _study())


def test_radiomics_are_computed_on_the_preprocessed_images(site_dir: Path) -> None:
    from client.steps.features import write_site_features

    site = load_site(site_dir)
    study = _study()
    inputs = load_imaging_inputs(site, study)
    path, table = write_site_features(site, study, spacing=SPACING, workers=1)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["inputs"] == "preprocessed" and sidecar["plan_sha256"] == inputs.plan_sha256
    frame = pd.read_csv(path, dtype={"patient_id": str}).set_index("patient_id")
    raw = {c.patient_id: c for c in site.cases}
    checked = 0
    for case in inputs.site.cases:
        if case.mask is None:
            continue
        mask = sitk.GetArrayFromImage(read_image(case.mask)) > 0
        pre = sitk.GetArrayFromImage(read_image(case.images["T2w"]))[mask].mean()
        raw_mask = sitk.GetArrayFromImage(read_image(raw[case.patient_id].mask)) > 0
        native = sitk.GetArrayFromImage(read_image(raw[case.patient_id].images["T2w"]))[raw_mask].mean()
        got = frame.loc[case.patient_id, "T2w_original_firstorder_Mean"]
        assert got == pytest.approx(pre, rel=1e-5), case.patient_id
        assert abs(got - native) > 0.5 * abs(native)  # z-scored, not the raw scanner units
        checked += 1
    assert checked == 5


def test_a_mask_on_the_plans_grid_goes_back_onto_the_native_grid(site_dir: Path) -> None:
    """The label-aware way back (probability resampled linearly, thresholded): the preprocessed radiologist mask,
    taken as a prediction, lands on the raw mask (what the coarser grid kept of it: a DSC of 0.72-0.91 on these
    small tumours at 1.3 x 1.3 x 1.5 mm; a wrong geometry, e.g. a flipped axis or the analysis grid's origin,
    gives ~0)."""
    site = load_site(site_dir)
    inputs = load_imaging_inputs(site, _study())
    raw = {c.patient_id: c for c in site.cases}
    scores = []
    for case in inputs.site.cases:
        if case.mask is None:
            continue
        analysis = read_image(case.mask)
        native = read_image(raw[case.patient_id].images["T2w"])
        back = native_mask(sitk.GetArrayFromImage(analysis).astype(np.float32), analysis, native)
        truth = sitk.GetArrayFromImage(read_image(raw[case.patient_id].mask)) > 0
        assert back.shape == truth.shape
        scores.append(2 * np.logical_and(back, truth).sum() / (back.sum() + truth.sum()))
    assert len(scores) == 5 and min(scores) > 0.65 and np.median(scores) > 0.8, scores


def test_the_apply_round_normalises_the_landmarks_rounds_stage_to_the_same_files(site_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """The landmarks round keeps each case before normalisation; the apply round only normalises it, writing
    byte-identical images to a full pass. A stage made for another spacing is not used."""
    from client.preprocessing.cohort import stage_key, write_stage
    from client.preprocessing.pipeline import build_pipeline, load_case
    from common.hashing import sha256_file

    site = load_site(site_dir)
    study = _study()
    plan = build_plan(study, SPACING, None, {"site-001": 6})
    stage = tmp_path / "stage"
    before = build_pipeline(study.preprocessing, SPACING, None, include_normalise=False)
    for case in site.cases:
        write_stage(before(load_case(case, study.sequences, "T2w")), stage,
                    stage_key(case, study.sequences, study.preprocessing, SPACING, study.hash))
    full = preprocess_site(site_dir, tmp_path / "full", study, plan=plan, workers=1)
    staged = preprocess_site(site_dir, tmp_path / "staged", study, plan=plan, workers=1, stage_dir=stage)
    assert sorted(full.completed) == sorted(staged.completed) and len(full.completed) == 6
    for pid in full.completed:
        for seq in ("T2w", "CET1"):
            rel = Path("images") / pid / f"{seq}.nii.gz"
            assert sha256_file(tmp_path / "full" / rel) == sha256_file(tmp_path / "staged" / rel)
        assert full.completed[pid].history_sha256 == staged.completed[pid].history_sha256
    other = build_plan(study, (1.6, 1.6, 1.6), None, {"site-001": 6})  # the stage's key names 1.3 x 1.3 x 1.5
    moved = preprocess_site(site_dir, tmp_path / "other", study, plan=other, workers=1, stage_dir=stage)
    pid = sorted(moved.completed)[0]
    assert read_image(tmp_path / "other" / "images" / pid / "T2w.nii.gz").GetSpacing() == pytest.approx((1.6,) * 3)


def test_a_raw_image_changed_after_preprocessing_is_refused(site_dir: Path, tmp_path: Path) -> None:
    import shutil

    from common.imageio import write_image

    copy = tmp_path / "site"
    shutil.copytree(site_dir, copy)
    load_imaging_inputs(load_site(copy), _study())  # as preprocessed: fine
    case = load_site(copy).cases[0]
    image = read_image(case.images["CET1"])
    write_image(image * 1.01, case.images["CET1"])  # the hospital replaced the series afterwards
    with pytest.raises(SiteDataError, match="changed after it was preprocessed") as err:
        load_imaging_inputs(load_site(copy), _study())
    assert "preprocessing phase" in str(err.value)


def test_feature_tables_of_other_inputs_do_not_feed_the_later_phases(site_dir: Path) -> None:
    from client.steps.features import write_site_features
    from client.steps.harmonisation import load_cohort
    from client.steps.inputs import check_feature_inputs

    site = load_site(site_dir)
    write_site_features(site, _study(), spacing=SPACING, workers=1)  # on the preprocessed cases
    check_feature_inputs(site, _study())
    raw = _study(phases=["fingerprint", "features", "harmonisation"])
    with pytest.raises(SiteDataError, match="features phase"):
        load_cohort(site, raw)  # a study on raw images must not harmonise preprocessed-image features
