"""Fixtures of the features tests: pyradiomics' real-MRI test data and one phantom case in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk


@pytest.fixture(scope="session")
def pyradiomics_data_dir() -> Path:
    """pyradiomics 3.0.1's data folder (brain1 + baselines); skips, saying why, only when it cannot be had."""
    from simulations.realdata import pyradiomics_data

    data_dir, reason = pyradiomics_data()
    if data_dir is None:
        pytest.skip(f"real-data parity needs pyradiomics 3.0.1's source distribution: {reason}")
    return data_dir


@pytest.fixture(scope="session")
def phantom_case() -> tuple[sitk.Image, sitk.Image]:
    """A simulated T2w image and its tumour mask (32^3)."""
    from common.imageio import array_to_image
    from simulations.phantoms import simulate_patient

    p = simulate_patient(0, 1, size=32, seed=0)
    spacing = (1.0, 1.0, 1.0)
    return array_to_image(p.images["T2w"].astype("float32"), spacing), array_to_image(p.mask.astype("uint8"), spacing)
