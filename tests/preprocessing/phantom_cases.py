"""Phantom cases with known ground truth, as SimpleITK images, for the preprocessing tests."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from client.preprocessing.base import CaseVolumes
from common.imageio import array_to_image
from simulations.phantoms import PatientPhantom, ScannerProfile, scanner_for_site, simulate_patient


def phantom(site: int, size: int = 32, patient: int = 0) -> tuple[PatientPhantom, ScannerProfile]:
    """A simulated patient of simulated site ``site`` (0-based) and that site's scanner."""
    scanner, _ = scanner_for_site(site, 0)
    return simulate_patient(site, patient, size=size, seed=0), scanner


def image(ph: PatientPhantom, array: np.ndarray) -> sitk.Image:
    """An array on the phantom's grid."""
    return array_to_image(np.asarray(array), ph.spacing, ph.origin)


def case(ph: PatientPhantom) -> CaseVolumes:
    """The phantom's images and mask as a case (reference T2w)."""
    images = {seq: image(ph, arr.astype(np.float32)) for seq, arr in ph.images.items()}
    return CaseVolumes(ph.patient_id, images, image(ph, ph.mask.astype(np.uint8)), "T2w")


def noise_free(ph: PatientPhantom, scanner: ScannerProfile, seq: str) -> np.ndarray:
    """What the scanner would show without noise: scale x clean signal x bias field + offset."""
    return scanner.intensity_scale * ph.clean[seq].astype(np.float64) * ph.bias + scanner.intensity_offset


def tissue(ph: PatientPhantom, label: int, erode: int = 1) -> np.ndarray:
    """A tissue's voxels, eroded away from partial-volume edges."""
    return ndimage.binary_erosion(ph.tissues == label, iterations=erode) if erode else ph.tissues == label


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())
