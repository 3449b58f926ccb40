"""client.features.radiomics.extract: parity with pyradiomics' published baseline on real MRI, the default feature
set, settings pass-through, and the documented pitfalls (Kurtosis, complex eigenvalues, logging)."""

from __future__ import annotations

import ast
import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import stats

from client.features.radiomics import FEATURE_CLASSES, N_DEFAULT_FEATURES, ExtractionError, extract


def _baseline(data_dir: Path, cls: str, test: str = "brain1") -> tuple[dict, dict[str, float]]:
    """One test column of baseline_<cls>.csv: its configuration (as pyradiomics' testUtils reads it) and values."""
    with open(data_dir / "baseline" / f"baseline_{cls}.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    col = rows[0].index(test)
    config = {r[0]: r[col] for r in rows[1:] if "diagnostics" in r[0]}
    values = {r[0]: float(r[col]) for r in rows[1:] if "diagnostics" not in r[0]}
    return config, values


def _percent_diff(value: float, baseline: float) -> float:
    """pyradiomics' tests/testUtils.py checkResult: |1 - value/baseline|, 0/1 when the baseline is 0."""
    if baseline == 0.0:
        return 0.0 if value == 0.0 else 1.0
    return abs(1.0 - value / baseline)


def test_parity_with_pyradiomics_baseline_on_brain1(pyradiomics_data_dir: Path) -> None:
    # Prepare: the real MRI case, read as pyradiomics' own tests read it (mask as UInt32), hashes checked.
    image = sitk.ReadImage(str(pyradiomics_data_dir / "brain1_image.nrrd"))
    mask = sitk.ReadImage(str(pyradiomics_data_dir / "brain1_label.nrrd"), sitk.sitkUInt32)
    checked, diffs = 0, {}
    for cls in FEATURE_CLASSES:
        config, baseline = _baseline(pyradiomics_data_dir, cls)
        assert config["diagnostics_Configuration_TestCase"] == "brain1"
        assert sitk.Hash(image) == config["diagnostics_Image-original_Hash"]
        assert sitk.Hash(mask) == config["diagnostics_Mask-original_Hash"]
        settings = ast.literal_eval(config["diagnostics_Configuration_Settings"])
        settings["imageType"] = ast.literal_eval(config["diagnostics_Configuration_EnabledImageTypes"])
        settings["featureClass"] = [cls]
        # Execute
        values = extract(image, mask, settings, label=settings.get("label", 1))
        # Assert: every baseline feature of the plain configuration, within pyradiomics' own 3% rule
        assert set(values) == set(baseline), cls
        for name, expected in baseline.items():
            diffs[name] = _percent_diff(values[name], expected)
            checked += 1
    assert checked == N_DEFAULT_FEATURES
    worst = max(diffs, key=diffs.__getitem__)
    assert diffs[worst] < 0.03, f"{worst}: {diffs[worst]:.2%} from pyradiomics' baseline"


def test_default_extract_gives_the_107_features_as_ordered_floats(phantom_case) -> None:
    image, mask = phantom_case
    values = extract(image, mask)
    assert len(values) == N_DEFAULT_FEATURES
    assert all(type(v) is float and math.isfinite(v) for v in values.values())
    classes = [name.split("_")[1] for name in values]
    assert classes == sorted(classes, key=FEATURE_CLASSES.index)  # grouped in the study's class order
    counts = {c: classes.count(c) for c in FEATURE_CLASSES}
    assert counts == {"shape": 14, "firstorder": 18, "glcm": 24, "glrlm": 16, "glszm": 16, "gldm": 14, "ngtdm": 5}
    assert not any(name.startswith("diagnostics_") for name in values)
    # the voxel volume is the voxel count times the voxel volume (1 mm^3)
    assert values["original_shape_VoxelVolume"] == pytest.approx(float(sitk.GetArrayFromImage(mask).sum()))


def _box_case(rng: np.random.Generator, spacing=(1.0, 1.0, 1.0)) -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    array = rng.gamma(2.0, 100.0, size=(20, 20, 20)).astype(np.float64)
    mask = np.zeros(array.shape, np.uint8)
    mask[4:14, 5:15, 3:13] = 1
    image, label = sitk.GetImageFromArray(array), sitk.GetImageFromArray(mask)
    for im in (image, label):
        im.SetSpacing(spacing)
    return image, label, array[mask == 1]


def test_kurtosis_is_ibsi_excess_kurtosis_plus_three() -> None:
    image, mask, voxels = _box_case(np.random.default_rng(3))
    values = extract(image, mask, {"featureClass": ["firstorder"]})
    ibsi_excess = stats.kurtosis(voxels, fisher=True, bias=True)
    assert values["original_firstorder_Kurtosis"] == pytest.approx(ibsi_excess + 3.0, rel=1e-9)
    assert values["original_firstorder_Mean"] == pytest.approx(voxels.mean(), rel=1e-12)


def test_settings_pass_through_to_pyradiomics() -> None:
    image, mask, voxels = _box_case(np.random.default_rng(4))
    coarse = extract(image, mask, {"binWidth": 100, "featureClass": ["firstorder", "glcm"]})
    fine = extract(image, mask, {"binWidth": 10, "featureClass": ["firstorder", "glcm"]})
    assert set(coarse) == {n for n in fine}
    assert coarse["original_firstorder_Mean"] == fine["original_firstorder_Mean"]  # binning-free feature
    assert coarse["original_glcm_JointEnergy"] > fine["original_glcm_JointEnergy"]  # fewer, fuller bins
    # resampling 1 mm -> 2 mm keeps the physical volume of the 10x10x10 mm box
    resampled = extract(image, mask, {"resampledPixelSpacing": [2, 2, 2], "featureClass": ["shape"]})
    assert resampled["original_shape_VoxelVolume"] == pytest.approx(1000.0, rel=0.15)
    assert resampled["original_shape_VoxelVolume"] != extract(image, mask, {"featureClass": ["shape"]})[
        "original_shape_MeshVolume"]


def test_label_selects_the_region_and_a_missing_label_is_an_extraction_error(phantom_case) -> None:
    image, mask = phantom_case
    two = sitk.GetArrayFromImage(mask).astype(np.uint8)
    second = np.zeros_like(two)
    second[2:8, 2:8, 2:8] = 2
    relabelled = sitk.GetImageFromArray(np.where(two > 0, 1, second).astype(np.uint8))
    relabelled.CopyInformation(mask)
    v1 = extract(image, relabelled, {"featureClass": ["shape"]}, label=1)
    v2 = extract(image, relabelled, {"featureClass": ["shape"]}, label=2)
    assert v2["original_shape_VoxelVolume"] == 216.0
    assert v1["original_shape_VoxelVolume"] == float((two > 0).sum())
    with pytest.raises(ExtractionError, match=r"label 3.*not present"):
        extract(image, relabelled, label=3)


def test_complex_eigenvalues_become_floats(monkeypatch: pytest.MonkeyPatch, phantom_case) -> None:
    """Regression: with an eigvals that returns complex128 (numpy >= 2.5 behaviour), shape features were complex."""
    image, mask = phantom_case
    real = extract(image, mask, {"featureClass": ["shape"]})
    original = np.linalg.eigvals
    monkeypatch.setattr(np.linalg, "eigvals", lambda a: original(a).astype(np.complex128))
    converted = extract(image, mask, {"featureClass": ["shape"]})
    assert converted == pytest.approx(real, rel=1e-12)  # complex sqrt may differ in the last bit
    assert all(type(v) is float for v in converted.values())
    # a genuinely complex value is refused, never truncated silently
    monkeypatch.setattr(np.linalg, "eigvals", lambda a: original(a).astype(np.complex128) + 1e-3j)
    with pytest.raises(ExtractionError, match="complex"):
        extract(image, mask, {"featureClass": ["shape"]})


def test_pyradiomics_logging_is_routed_and_quiet(caplog: pytest.LogCaptureFixture, phantom_case) -> None:
    import radiomics

    image, mask = phantom_case
    with caplog.at_level(logging.DEBUG):
        extract(image, mask)
    logger = logging.getLogger("radiomics")
    assert radiomics.handler not in logger.handlers  # pyradiomics' own stderr handler is gone
    assert logger.level == logging.WARNING
    radiomics_records = [r for r in caplog.records if r.name.startswith("radiomics")]
    assert radiomics_records == []  # no INFO chatter, no per-case "Sum Average" warning
    # a real warning still reaches fedbiopsy's logging: the mask on another grid is corrected
    shifted = sitk.Image(mask)
    shifted.SetOrigin((0.5, 0.0, 0.0))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        extract(image, shifted, {"correctMask": True, "featureClass": ["firstorder"]})
    assert any("geometry mismatch" in r.getMessage() for r in caplog.records if r.name.startswith("radiomics"))
