"""Simulated hospitals: determinism and ground truth (tumour, labels, scanner effects, survival)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from common.hashing import sha256_file
from common.sitedata import load_site_config
from simulations.phantoms import (
    SCANNER_PRESETS,
    TISSUE_SIGNAL,
    TISSUES,
    scanner_for_site,
    simulate_patient,
    simulate_sites,
)


def test_same_seed_same_patient_other_seed_other_patient() -> None:
    a, b = simulate_patient(1, 2, size=32, seed=5), simulate_patient(1, 2, size=32, seed=5)
    c = simulate_patient(1, 2, size=32, seed=6)
    for seq in a.images:
        np.testing.assert_array_equal(a.images[seq], b.images[seq])
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.clinical == b.clinical
    assert not np.array_equal(a.mask, c.mask)


def test_site_content_does_not_depend_on_how_many_sites_are_generated(tmp_path) -> None:
    two = simulate_sites(tmp_path / "two", sites=2, patients=2, size=24, seed=3)
    three = simulate_sites(tmp_path / "three", sites=3, patients=2, size=24, seed=3)
    for a, b in zip(two, three[:2], strict=True):
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        assert [sha256_file(a / f) for f in files] == [sha256_file(b / f) for f in files]


def test_written_site_matches_ground_truth(small_sites) -> None:
    site = small_sites[1]
    config = load_site_config(site)
    clinical = pd.read_csv(site / "clinical.csv", dtype={"patient_id": str})
    assert list(clinical.columns[:6]) == ["patient_id", "age", "sex", "label", "os_days", "os_event"]
    row = clinical.iloc[0]
    mask = sitk.ReadImage(str(site / "masks" / f"{row.patient_id}.nii.gz"))
    t2 = sitk.ReadImage(str(site / "images" / row.patient_id / "T2w.nii.gz"))
    assert mask.GetSpacing() == pytest.approx(config.scanner.spacing)
    assert t2.GetSpacing() == pytest.approx(config.scanner.spacing)
    arr = sitk.GetArrayFromImage(mask)
    voxel_ml = np.prod(config.scanner.spacing) / 1000.0
    assert arr.sum() * voxel_ml == pytest.approx(row.tumour_volume_ml, abs=1e-3)
    assert set(np.unique(arr)) == {0, 1}
    assert ndimage.label(arr)[1] == 1  # one connected tumour


def test_tumours_are_irregular_and_subtypes_differ_in_texture_and_enhancement() -> None:
    patients = [simulate_patient(0, p, size=48, seed=11) for p in range(16)]
    labels = np.array([p.clinical["label"] for p in patients])
    assert 0.25 <= labels.mean() <= 0.75  # both subtypes, roughly balanced
    cv, rim_contrast = {0: [], 1: []}, {0: [], 1: []}
    for p in patients:
        m = p.mask.astype(bool)
        # Irregular: more surface than a digital sphere of the same volume (anisotropic spacing aside).
        radius = (3 * m.sum() / (4 * np.pi)) ** (1 / 3)
        sphere = np.sum(np.square(np.indices((48, 48, 48)) - 24), axis=0) <= radius**2
        assert _surface(m) > 1.1 * _surface(sphere)
        t = p.clean["CET1"][m]
        cv[p.clinical["label"]].append(t.std() / t.mean())
        inner = ndimage.binary_erosion(m, iterations=2)
        if inner.sum() > 10:
            rim_contrast[p.clinical["label"]].append(p.clean["CET1"][m & ~inner].mean() / p.clean["CET1"][inner].mean())
    assert min(cv[1]) > max(cv[0])  # necrotic-rim tumours are heterogeneous, homogeneous ones are not
    assert np.median(rim_contrast[1]) > 2.0 > np.median(rim_contrast[0])  # enhancing rim around a necrotic core


def _surface(mask: np.ndarray) -> int:
    return int((mask & ~ndimage.binary_erosion(mask)).sum())


def _fit_bias_amplitude(p) -> float:
    """Measure the bias amplitude from the image alone: fit a smooth polynomial to image/expected in body tissue."""
    scanner, _ = scanner_for_site(0, 0)
    body = p.tissues == TISSUES["body"]
    ratio = (p.images["T2w"][body] - scanner.intensity_offset) / (scanner.intensity_scale * TISSUE_SIGNAL["T2w"][1])
    zz, yy, xx = (c[body] / 32.0 for c in np.indices(p.tissues.shape))
    design = np.stack([np.ones_like(xx), xx, yy, zz, xx * yy, xx**2, yy**2, zz**2, xx * zz, yy * zz], axis=1)
    coef, *_ = np.linalg.lstsq(design, ratio, rcond=None)
    field = np.zeros(p.tissues.shape)
    body_fat = p.tissues > 0
    zz2, yy2, xx2 = (c[body_fat] / 32.0 for c in np.indices(p.tissues.shape))
    full = np.stack([np.ones_like(xx2), xx2, yy2, zz2, xx2 * yy2, xx2**2, yy2**2, zz2**2, xx2 * zz2, yy2 * zz2], 1)
    field[body_fat] = full @ coef
    vals = field[body_fat]
    return float((vals.max() - vals.min()) / (vals.max() + vals.min()))


def test_site_effects_are_as_configured() -> None:
    site0 = simulate_patient(0, 0, size=64, seed=0)
    amplitude = SCANNER_PRESETS[0].bias_amplitude
    assert _fit_bias_amplitude(site0) == pytest.approx(amplitude, abs=0.04)
    # Vendor scale/offset: body tissue median per site follows scale * signal + offset (bias averages out).
    for index in range(3):
        scanner, _ = scanner_for_site(index, 0)
        p = simulate_patient(index, 0, size=48, seed=0)
        body = p.tissues == TISSUES["body"]
        signal = TISSUE_SIGNAL["CET1"][1]
        expected = scanner.intensity_scale * signal * np.median(p.bias[body]) + scanner.intensity_offset
        assert np.median(p.images["CET1"][body]) == pytest.approx(expected, rel=0.04)
        # Rician noise: far from the body the magnitude is Rayleigh with the configured sigma.
        bg = p.tissues == 0
        far = ~ndimage.binary_dilation(~bg, iterations=3) & bg
        rayleigh_mean = (p.images["T2w"][far] - scanner.intensity_offset).mean()
        sigma = rayleigh_mean / (scanner.intensity_scale * np.sqrt(np.pi / 2))
        assert sigma == pytest.approx(scanner.noise_sigma * 1000.0, rel=0.1)


def test_survival_depends_on_the_tumour_and_is_censored() -> None:
    rows = pd.DataFrame([simulate_patient(s, p, size=24, seed=2).clinical for s in range(3) for p in range(30)])
    assert rows.os_days.min() >= 1 and set(rows.os_event) == {0, 1}
    assert 0.1 < 1 - rows.os_event.mean() < 0.8  # censoring present but not dominant
    from lifelines import CoxPHFitter

    cph = CoxPHFitter().fit(rows[["os_days", "os_event", "label"]], "os_days", "os_event")
    assert cph.params_["label"] > 0.3 and cph.summary.loc["label", "p"] < 0.05  # necrotic subtype: higher hazard
