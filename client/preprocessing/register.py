"""Rigid registration of every sequence to the reference sequence (SimpleITK, Mattes mutual information).

Euler 3D transform initialised on the images' geometric centres, Mattes MI over a random sample of the
reference's (dilated) foreground, regular-step gradient descent with scales from physical shifts, a
multi-resolution schedule. Each moved sequence is resampled (linear) onto the reference grid, so every
sequence shares the reference's geometry afterwards; the mask, drawn on the reference, is untouched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import SimpleITK as sitk

from client.preprocessing.base import CaseVolumes, Step, register_step
from client.preprocessing.foreground import foreground_mask
from client.preprocessing.resample import resample_onto
from common.errors import ConfigError

log = logging.getLogger(__name__)


def _mattes(fixed: sitk.Image, moving: sitk.Image, histogram_bins: int, sampling_fraction: float,
            seed: int) -> sitk.ImageRegistrationMethod:
    """A registration method with the metric both the optimisation and the final check use."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(histogram_bins))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(sampling_fraction), int(seed))
    reg.SetMetricFixedMask(sitk.BinaryDilate(foreground_mask(fixed, "reference sequence"), [2, 2, 2]))
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def _metric_at(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, histogram_bins: int,
               sampling_fraction: float, seed: int) -> float:
    reg = _mattes(fixed, moving, histogram_bins, sampling_fraction, seed)
    reg.SetInitialTransform(transform, inPlace=False)
    return float(reg.MetricEvaluate(fixed, moving))


def register_rigid(fixed: sitk.Image, moving: sitk.Image, histogram_bins: int = 16,
                   sampling_fraction: float = 0.25, iterations: int = 200,
                   shrink_factors: Sequence[int] = (2, 1), seed: int = 1) -> tuple[sitk.Euler3DTransform, float]:
    """The rigid transform mapping fixed-image points to moving-image points, and the final metric value.

    ``seed`` (>= 1) fixes the metric's random sample, so a registration is repeatable (SimpleITK takes 0 to mean
    "seed from the wall clock"). A result whose full-resolution metric is worse than the starting transform's
    (the optimiser walked off, as Mattes MI with 32 bins did on denoised, bias-corrected 1.5T phantoms: 5-12 mm
    off on images aligned to 0.1 mm) is discarded for the starting transform (logged).
    """
    if seed < 1:
        raise ConfigError("preprocessing.registration.seed", f"{seed} is not >= 1",
                          "give a positive seed (0 would seed from the wall clock)")
    fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
    moving_f = sitk.Cast(moving, sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(fixed_f, moving_f, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = _mattes(fixed_f, moving_f, histogram_bins, sampling_fraction, seed)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=int(iterations),
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(f) for f in shrink_factors])
    reg.SetSmoothingSigmasPerLevel([max(0.0, float(f) - 1.0) for f in shrink_factors])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    result = reg.Execute(fixed_f, moving_f)
    composite = sitk.CompositeTransform(result)
    euler = sitk.Euler3DTransform(composite.GetNthTransform(composite.GetNumberOfTransforms() - 1))
    final = _metric_at(fixed_f, moving_f, euler, histogram_bins, sampling_fraction, seed)
    start = _metric_at(fixed_f, moving_f, initial, histogram_bins, sampling_fraction, seed)
    if final > start:  # Mattes MI is minimised (its negative): the optimiser made the alignment worse
        log.info("rigid registration ended worse than it started (Mattes MI %.3f > %.3f): keeping the "
                    "starting transform", final, start)
        return sitk.Euler3DTransform(initial), start
    return euler, final


@register_step
@dataclass(frozen=True)
class RigidRegister(Step):
    """Every non-reference sequence registered rigidly (Mattes MI) to the reference and resampled onto its grid."""

    name = "register"
    libraries = ("SimpleITK", "numpy")

    histogram_bins: int = 16
    sampling_fraction: float = 0.25
    iterations: int = 200
    shrink_factors: tuple[int, ...] = (2, 1)
    seed: int = 1

    def apply(self, case: CaseVolumes) -> tuple[CaseVolumes, dict[str, Any]]:
        ref = case.images[case.reference]
        images: dict[str, sitk.Image] = {}
        details: dict[str, Any] = {}
        for seq, image in case.intensity_images().items():
            if seq == case.reference:
                images[seq] = image
                continue
            transform, metric = register_rigid(ref, image, self.histogram_bins, self.sampling_fraction,
                                               self.iterations, self.shrink_factors, self.seed)
            images[seq] = resample_onto(image, ref, "linear", transform)
            details[seq] = {
                "rotation_deg": [math.degrees(a) for a in (transform.GetAngleX(), transform.GetAngleY(),
                                                           transform.GetAngleZ())],
                "translation_mm": list(transform.GetTranslation()),
                "center_mm": list(transform.GetCenter()),
                "mattes_mi": metric,
            }
        return case.with_images(images), details
