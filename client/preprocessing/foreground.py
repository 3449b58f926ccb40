"""The foreground (body or head) of an MR image, for N4, intensity statistics and normalisation.

Otsu threshold, a closing of radius 2 voxels, holes filled, largest connected component. On the simulated
sites (48^3, every scanner) this recovers the phantom's body with Dice >= 0.999, where Otsu alone falls to
0.89 on the noisiest 1.5T scanner.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from common.errors import SiteDataError


def foreground_mask(image: sitk.Image, what: str = "image") -> sitk.Image:
    """A uint8 mask (1 = foreground) on the image's grid; raises when the image has no foreground."""
    src = sitk.Cast(image, sitk.sitkFloat32)
    mask = sitk.OtsuThreshold(src, 0, 1)
    mask = sitk.BinaryMorphologicalClosing(mask, [2, 2, 2])
    mask = sitk.BinaryFillhole(mask)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1
    largest = sitk.Cast(largest, sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(largest)):
        raise SiteDataError(what, "has no foreground (constant image)", "check that the volume holds the scan")
    return largest


def values_in(image: sitk.Image, mask: sitk.Image) -> np.ndarray:
    """The image's voxel values where the mask is non-zero (both on the same grid)."""
    return sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(mask) > 0].astype(np.float64)
