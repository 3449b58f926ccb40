"""NLM denoising: SNR of a tissue region against the known noise-free signal."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from client.preprocessing.denoise import NLMDenoise, denoise_nlm
from tests.preprocessing.phantom_cases import case, image, noise_free, phantom, tissue


def _snr(values: np.ndarray, truth: np.ndarray, region: np.ndarray) -> float:
    """Mean true signal over the RMS error, in the region."""
    return float(truth[region].mean() / np.sqrt(np.mean((values[region] - truth[region]) ** 2)))


def test_nlm_raises_tissue_snr_at_least_1_5x() -> None:
    for site in (1, 3):  # the two 1.5T (noisy) scanners
        ph, scanner = phantom(site, size=32)
        for seq in ("T2w", "CET1"):
            truth = noise_free(ph, scanner, seq)
            body = tissue(ph, 1)
            raw = ph.images[seq]
            out, sigma = denoise_nlm(image(ph, raw))
            snr_raw, snr_out = _snr(raw, truth, body), _snr(sitk.GetArrayFromImage(out), truth, body)
            assert snr_out >= 1.5 * snr_raw, (site, seq, snr_raw, snr_out)
            # the noise estimate is of the right order (true sigma = scale x noise_sigma x 1000)
            assert 0.3 < sigma / (scanner.intensity_scale * scanner.noise_sigma * 1000) < 1.5


def test_denoise_step_records_itself_and_keeps_geometry_and_mask() -> None:
    ph, _ = phantom(1, size=32)
    before = case(ph)
    after = NLMDenoise(strength=0.6)(before)
    rec = after.history[-1]
    assert rec["step"] == "denoise" and rec["args"] == {"patch_size": 3, "patch_distance": 2, "strength": 0.6}
    assert set(rec["libraries"]) == {"scikit-image", "SimpleITK", "numpy"}
    assert all(v and v != "unknown" for v in rec["libraries"].values())
    assert set(rec["details"]["noise_sigma"]) == {"T2w", "CET1"}
    assert after.mask is before.mask
    for seq in ("T2w", "CET1"):
        assert after.images[seq].GetSpacing() == before.images[seq].GetSpacing()
        assert after.images[seq].GetOrigin() == before.images[seq].GetOrigin()
        assert not np.array_equal(sitk.GetArrayFromImage(after.images[seq]), ph.images[seq])
