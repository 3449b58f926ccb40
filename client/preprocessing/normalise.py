"""Intensity normalisation within the foreground: z-score, percentile rescaling, Nyúl standardisation.

The foreground is the reference sequence's (:func:`foreground_mask`), used for every sequence on the same
grid (after registration or resampling all are); a sequence on another grid uses its own foreground.
Nyúl's standard scale comes from the federated plan (:mod:`common.nyul`); :func:`nyul_case_landmarks` is what
a site measures to learn it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from client.preprocessing.base import CaseVolumes, Step, register_step, same_grid
from client.preprocessing.foreground import foreground_mask, values_in
from common.errors import ConfigError
from common.nyul import case_landmarks, nyul_transform


def case_foregrounds(case: CaseVolumes) -> dict[str, sitk.Image]:
    """The foreground mask used for each sequence of the case."""
    ref_fg = foreground_mask(case.images[case.reference], f"{case.patient_id}/{case.reference}")
    return {seq: ref_fg if same_grid(img, ref_fg) else foreground_mask(img, f"{case.patient_id}/{seq}")
            for seq, img in case.intensity_images().items()}


def _mapped(image: sitk.Image, fn: Any) -> sitk.Image:
    out = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(image).astype(np.float64)).astype(np.float32))
    out.CopyInformation(image)
    return out


def nyul_case_landmarks(case: CaseVolumes, percentiles: Sequence[float]) -> dict[str, np.ndarray]:
    """Each sequence's foreground landmarks (stays at the site; the site step averages them)."""
    fgs = case_foregrounds(case)
    return {seq: case_landmarks(values_in(img, fgs[seq]), percentiles)
            for seq, img in case.intensity_images().items()}


@register_step
@dataclass(frozen=True)
class ZScoreNormalise(Step):
    """(x - mean) / sd of the foreground, per sequence."""

    name = "zscore"

    def apply(self, case: CaseVolumes) -> tuple[CaseVolumes, dict[str, Any]]:
        fgs = case_foregrounds(case)
        images, details = {}, {}
        for seq, img in case.intensity_images().items():
            v = values_in(img, fgs[seq])
            mean, sd = float(v.mean()), float(v.std())
            if not sd > 0:
                raise ConfigError(f"{case.patient_id}/{seq}", "foreground is constant", "check the volume")
            images[seq] = _mapped(img, lambda a, m=mean, s=sd: (a - m) / s)
            details[seq] = {"mean": mean, "sd": sd}
        return case.with_images(images), details


@register_step
@dataclass(frozen=True)
class PercentileRescale(Step):
    """Foreground percentiles ``percentiles`` mapped linearly onto ``output_range``, then clipped to it."""

    name = "percentile"

    percentiles: tuple[float, float] = (0.5, 99.5)
    output_range: tuple[float, float] = (0.0, 1.0)

    def apply(self, case: CaseVolumes) -> tuple[CaseVolumes, dict[str, Any]]:
        fgs = case_foregrounds(case)
        lo_out, hi_out = self.output_range
        images, details = {}, {}
        for seq, img in case.intensity_images().items():
            lo, hi = np.percentile(values_in(img, fgs[seq]), self.percentiles)
            if not hi > lo:
                raise ConfigError(f"{case.patient_id}/{seq}", "foreground percentiles coincide", "check the volume")
            images[seq] = _mapped(img, lambda a, lo=lo, hi=hi: np.clip(
                lo_out + (a - lo) * (hi_out - lo_out) / (hi - lo), lo_out, hi_out))
            details[seq] = {"low": float(lo), "high": float(hi)}
        return case.with_images(images), details


@register_step
@dataclass(frozen=True)
class NyulStandardise(Step):
    """Each sequence mapped piecewise-linearly from its own landmarks onto the federated standard scale."""

    name = "nyul"

    percentiles: tuple[float, ...]
    landmarks: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def apply(self, case: CaseVolumes) -> tuple[CaseVolumes, dict[str, Any]]:
        missing = [seq for seq in case.intensity_images() if seq not in self.landmarks]
        if missing:
            raise ConfigError("plan", f"no Nyúl landmarks for sequence(s) {missing}",
                              "use the plan built for this study's sequences")
        own = nyul_case_landmarks(case, self.percentiles)
        images = {seq: _mapped(img, lambda a, s=seq: nyul_transform(a, own[s], np.asarray(self.landmarks[s])))
                  for seq, img in case.intensity_images().items()}
        return case.with_images(images), {seq: {"image_landmarks": lm.tolist()} for seq, lm in own.items()}
