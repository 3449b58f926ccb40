"""N4: removes most of a known bias field (within-tissue coefficient of variation)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from client.preprocessing.bias import N4BiasCorrection, effective_shrink, n4_correct
from tests.preprocessing.phantom_cases import case, image, phantom, tissue


def _cv(values: np.ndarray, region: np.ndarray) -> float:
    return float(values[region].std() / values[region].mean())


def test_n4_removes_at_least_half_of_the_cv_the_bias_added() -> None:
    for site in (0, 1, 3):
        ph, scanner = phantom(site, size=32)
        rng = np.random.default_rng(site)
        sigma = scanner.noise_sigma * 1000.0
        n1, n2 = sigma * rng.standard_normal((2, *ph.bias.shape))
        clean = ph.clean["T2w"].astype(np.float64)
        # the same scanner and the same noise, once without and once with the site's bias field
        unbiased = scanner.intensity_scale * np.hypot(clean + n1, n2) + scanner.intensity_offset
        biased = scanner.intensity_scale * np.hypot(clean * ph.bias + n1, n2) + scanner.intensity_offset
        corrected, details = n4_correct(image(ph, biased.astype(np.float32)), shrink_factor=4)
        body = tissue(ph, 1)
        added = _cv(biased, body) - _cv(unbiased, body)
        removed = _cv(biased, body) - _cv(sitk.GetArrayFromImage(corrected), body)
        assert added > 0.01, (site, added)  # the bias field matters in this tissue
        assert removed >= 0.5 * added, (site, added, removed)
        assert details["shrink"] == [2, 2, 2]  # 32 voxels: shrunk to 16, not 8


def test_shrink_never_goes_below_16_voxels_per_axis() -> None:
    assert effective_shrink((128, 128, 128), 4) == [4, 4, 4]
    assert effective_shrink((256, 256, 25), 4) == [4, 4, 1]  # thin stacks are not shrunk through the slices
    assert effective_shrink((40, 20, 10), 1) == [1, 1, 1]


def test_n4_step_corrects_every_sequence_and_records_the_field() -> None:
    ph, _ = phantom(0, size=32)
    out = N4BiasCorrection(shrink_factor=2)(case(ph))
    rec = out.history[-1]
    assert rec["step"] == "bias" and rec["args"]["shrink_factor"] == 2
    for seq in ("T2w", "CET1"):
        d = rec["details"][seq]
        # the phantom's field spans 1 -/+ 0.20 inside the body; N4's estimate spans a comparable range
        assert d["field_max"] / d["field_min"] > 1.2
