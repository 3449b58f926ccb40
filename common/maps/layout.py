"""4D sequences on disk and the parametric maps made from them: names, units, sidecars and their checks.

A site lists ``DWI`` and/or ``DCE`` among its sequences (BIDS-like)::

    images/<pid>/DWI.nii.gz     4D, one volume per b-value
    images/<pid>/DWI.bval       one line of b-values in s/mm2 (FSL/BIDS), as many as volumes
    images/<pid>/DCE.nii.gz     4D dynamic series
    images/<pid>/DCE.json       acquisition sidecar (:class:`DCESidecar`)
    images/<pid>/T10.nii.gz     optional native-T1 map (s) on the DCE grid, instead of ``T10_s``

The site computes maps from them (``derived/maps/<pid>/<MAP>.nii.gz``); downstream a study's *channels* are
its 3D sequences with each 4D sequence replaced by the maps the study asks for (:func:`study_channels`).
Units: ADC and IVIM D, D* in mm2/s; Ktrans in 1/min; ve, vp and f as fractions; TTP in s; wash-in and wash-out
slopes in relative enhancement per min; iAUC60 in mM s; ER as a fraction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import SiteDataError

DWI = "DWI"
DCE = "DCE"
FOUR_D: tuple[str, ...] = (DWI, DCE)
MAPS_OF: dict[str, tuple[str, ...]] = {
    DWI: ("ADC", "IVIM_D", "IVIM_Dstar", "IVIM_f"),
    DCE: ("Ktrans", "ve", "vp", "TTP", "washin", "washout", "iAUC60", "ER"),
}
IVIM_MAPS: tuple[str, ...] = ("IVIM_D", "IVIM_Dstar", "IVIM_f")
MIN_IVIM_BVALUES = 4
UNITS: dict[str, str] = {
    "ADC": "mm2/s", "IVIM_D": "mm2/s", "IVIM_Dstar": "mm2/s", "IVIM_f": "fraction",
    "Ktrans": "1/min", "ve": "fraction", "vp": "fraction", "TTP": "s", "washin": "1/min", "washout": "1/min",
    "iAUC60": "mM s", "ER": "fraction",
}
MAPS_DIR = "maps"
BVAL_SUFFIX = ".bval"
SIDECAR_SUFFIX = ".json"
T10_MAP = "T10"


def is_map(channel: str) -> bool:
    """Whether a channel name is a parametric map (quantitative units: no intensity normalisation)."""
    return any(channel in names for names in MAPS_OF.values())


def study_channels(sequences: Sequence[str], maps: dict[str, Sequence[str]]) -> tuple[str, ...]:
    """The 3D channels of a study: each 4D sequence replaced by its maps ``maps[seq]``, in order."""
    out: list[str] = []
    for seq in sequences:
        out.extend(maps.get(seq, ()) if seq in FOUR_D else (seq,))
    return tuple(out)


class DCESidecar(BaseModel):
    """``DCE.json``: what turns the dynamic signal into concentration and pharmacokinetic maps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    AcquisitionTimes_s: tuple[float, ...] = Field(min_length=4)  # noqa: N815 (BIDS-style key)
    RepetitionTime_s: float = Field(gt=0, lt=1)  # noqa: N815
    FlipAngle_deg: float = Field(gt=0, lt=90)  # noqa: N815
    T10_s: float | None = Field(None, gt=0, lt=10)  # noqa: N815 (None: a T10.nii.gz map beside the series)
    Relaxivity_per_mM_s: float = Field(gt=0, lt=100)  # noqa: N815
    Hematocrit: float = Field(0.45, gt=0, lt=1)  # noqa: N815
    InjectionTime_s: float = Field(ge=0)  # noqa: N815 (the AIF's time zero on the acquisition clock)
    AIF: Literal["population:parker"] | tuple[float, ...] = "population:parker"
    BaselineVolumes: int = Field(ge=1)  # noqa: N815 (pre-contrast volumes: no default, a wrong one biases Ktrans)

    @field_validator("AcquisitionTimes_s")
    @classmethod
    def _increasing(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("AcquisitionTimes_s must increase strictly")
        return v

    @model_validator(mode="after")
    def _per_volume(self) -> DCESidecar:
        n = len(self.AcquisitionTimes_s)
        if self.BaselineVolumes >= n:
            raise ValueError(f"BaselineVolumes leaves no dynamic volume: give fewer pre-contrast volumes than {n}")
        if not isinstance(self.AIF, str) and len(self.AIF) != n:
            raise ValueError(f"AIF lists {len(self.AIF)} values for {n} acquisition times: give one blood "
                             "concentration (mM) per volume, or population:parker")
        return self


def sidecar_path(image: Path) -> Path:
    """``DCE.json`` beside ``DCE.nii.gz`` (or any suffix of :data:`common.imageio.IMAGE_SUFFIXES`)."""
    return image.parent / f"{DCE}{SIDECAR_SUFFIX}"


def bval_path(image: Path) -> Path:
    """``DWI.bval`` beside ``DWI.nii.gz``."""
    return image.parent / f"{DWI}{BVAL_SUFFIX}"


def read_bvals(path: Path) -> tuple[float, ...]:
    """The b-values (s/mm2) of an FSL/BIDS ``.bval`` file: one line, whitespace-separated."""
    if not path.is_file():
        raise SiteDataError(path, "the DWI series has no b-value file",
                            "write DWI.bval beside it: one line of b-values in s/mm2, one per volume")
    try:
        values = tuple(float(v) for v in path.read_text(encoding="utf-8").split())
    except ValueError as exc:
        raise SiteDataError(path, "the b-value file holds something that is not a number",
                            "write one line of numbers (s/mm2), one per volume") from exc
    if len(values) < 2 or any(v < 0 or not np.isfinite(v) for v in values):
        raise SiteDataError(path, "the b-value file needs at least two finite, non-negative b-values",
                            "list every volume's b-value in s/mm2 (e.g. 0 500 1000)")
    if len(set(values)) < 2:
        raise SiteDataError(path, "every volume has the same b-value; no ADC can be fitted",
                            "acquire (or list) at least two distinct b-values")
    return values


def read_sidecar(path: Path) -> DCESidecar:
    """``DCE.json``, validated; a missing or malformed sidecar names the key at fault."""
    if not path.is_file():
        raise SiteDataError(path, "the DCE series has no sidecar", "write DCE.json beside it (see docs: "
                            "AcquisitionTimes_s, RepetitionTime_s, FlipAngle_deg, T10_s, Relaxivity_per_mM_s, ...)")
    try:
        return DCESidecar.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise SiteDataError(path, f"not valid JSON ({exc.msg}, line {exc.lineno})", "correct the JSON") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise SiteDataError(path, f"invalid DCE sidecar ({problems})", "correct the named keys") from exc


def check_volume_count(path: Path, what: str, n_volumes: int, n_expected: int, source: str) -> None:
    """A 4D series must have one volume per b-value or acquisition time."""
    if n_volumes != n_expected:
        raise SiteDataError(path, f"the {what} series has {n_volumes} volume(s) but {source} lists {n_expected}",
                            f"give {source} one entry per volume, or re-export the series")


__all__ = ["DCE", "DWI", "FOUR_D", "IVIM_MAPS", "MAPS_DIR", "MAPS_OF", "MIN_IVIM_BVALUES", "UNITS", "DCESidecar",
           "T10_MAP", "bval_path", "check_volume_count", "is_map", "read_bvals", "read_sidecar", "sidecar_path",
           "study_channels"]
