"""Resampling to the study's target spacing: images linear or B-spline, masks nearest neighbour.

The reference sequence is resampled onto a grid of the target spacing that covers the same field of view
(centred on it); every other sequence and the mask are resampled onto that same grid, so a case leaves this
step with one geometry for all its volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from client.preprocessing.base import CaseVolumes, Step, register_step
from common.errors import ConfigError
from common.maps.layout import is_map

INTERPOLATORS: dict[str, int] = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
}


def target_grid(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """An empty image of ``spacing`` (x, y, z, mm) covering the field of view of ``image``, centred on it."""
    old_spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    old_size = np.asarray(image.GetSize(), dtype=np.float64)
    new_spacing = np.asarray(spacing, dtype=np.float64)
    if new_spacing.shape != old_spacing.shape or np.any(new_spacing <= 0):
        raise ConfigError("preprocessing.resample.target_spacing", f"{tuple(spacing)} is not "
                          f"{old_spacing.size} positive spacings", "give one positive spacing (mm) per axis")
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(old_spacing.size, old_spacing.size)
    # keep the centre of the field of view: shift the first voxel centre by half the change of extent
    shift = (old_spacing * (old_size - 1) - new_spacing * (new_size - 1)) / 2.0
    origin = np.asarray(image.GetOrigin(), dtype=np.float64) + direction @ shift
    grid = sitk.Image([int(n) for n in new_size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in new_spacing))
    grid.SetOrigin(tuple(float(o) for o in origin))
    grid.SetDirection(image.GetDirection())
    return grid


def resample_onto(image: sitk.Image, grid: sitk.Image, interpolator: str = "linear",
                  transform: sitk.Transform | None = None) -> sitk.Image:
    """``image`` resampled onto the geometry of ``grid`` (optionally through ``transform``, fixed -> moving).

    Images come out as float32 (outside the field of view: the image's minimum); masks (``"nearest"``)
    keep their pixel type (outside: 0).
    """
    if interpolator not in INTERPOLATORS:
        raise ConfigError("preprocessing.resample.interpolator", f"unknown interpolator {interpolator!r}",
                          f"use one of {sorted(INTERPOLATORS)}")
    is_mask = interpolator == "nearest"
    src = image if is_mask else sitk.Cast(image, sitk.sitkFloat32)
    default = 0.0 if is_mask else float(np.min(sitk.GetArrayViewFromImage(src)))
    return sitk.Resample(src, grid, transform or sitk.Transform(), INTERPOLATORS[interpolator], default,
                         src.GetPixelID())


def resample_image(image: sitk.Image, spacing: Sequence[float], interpolator: str = "linear") -> sitk.Image:
    """``image`` on a grid of ``spacing`` covering its field of view."""
    return resample_onto(image, target_grid(image, spacing), interpolator)


@register_step
@dataclass(frozen=True)
class Resample(Step):
    """Every sequence and the mask onto the reference sequence's field of view at ``target_spacing``."""

    name = "resample"
    libraries = ("SimpleITK", "numpy")

    target_spacing: tuple[float, float, float]
    interpolator: Literal["linear", "bspline"] = "linear"

    def apply(self, case: CaseVolumes) -> tuple[CaseVolumes, dict[str, Any]]:
        ref = case.images[case.reference]
        grid = target_grid(ref, self.target_spacing)
        images = {seq: resample_onto(img, grid, "linear" if is_map(seq) else self.interpolator)  # maps: no overshoot
                  for seq, img in case.images.items()}
        mask = resample_onto(case.mask, grid, "nearest") if case.mask is not None else None
        details = {"from_spacing": list(ref.GetSpacing()), "from_size": list(ref.GetSize()),
                   "to_size": list(grid.GetSize())}
        return case.replace(images=images, mask=mask), details
