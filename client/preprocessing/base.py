"""What a preprocessing step is: a small callable with typed arguments that records itself in the case's history.

A step is a frozen dataclass; its fields are its arguments. Calling it on a :class:`CaseVolumes` returns a new
:class:`CaseVolumes` whose ``history`` ends with the step's record: name, arguments, the versions of the
libraries it used, and what it measured (``details``). Steps are looked up by name in :data:`STEP_TYPES`, so a
recorded history can be replayed (:func:`steps_from_history`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any, ClassVar

import SimpleITK as sitk

from common.errors import ConfigError
from common.maps.layout import is_map


@dataclass(frozen=True)
class CaseVolumes:
    """One case in memory: images by sequence, the tumour mask (on the reference grid) and the history so far."""

    patient_id: str
    images: Mapping[str, sitk.Image]
    mask: sitk.Image | None
    reference: str
    history: tuple[dict[str, Any], ...] = ()

    def replace(self, **changes: Any) -> CaseVolumes:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def intensity_images(self) -> dict[str, sitk.Image]:
        """The images in scanner units: every channel but the parametric maps (quantitative, in physical units,
        already on the reference grid), which intensity steps (denoising, N4, registration, normalisation) pass
        through unchanged."""
        return {seq: img for seq, img in self.images.items() if not is_map(seq)}

    def with_images(self, changed: Mapping[str, sitk.Image]) -> CaseVolumes:
        """A copy with ``changed`` images replaced and the others (the maps) kept, in the original order."""
        return self.replace(images={seq: changed.get(seq, img) for seq, img in self.images.items()})


@cache
def library_version(distribution: str) -> str:
    """The installed version of a distribution ("unknown" when not installed as one)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Step:
    """Base class of the preprocessing steps; subclasses define ``name``, ``libraries`` and :meth:`apply`."""

    name: ClassVar[str] = "step"
    libraries: ClassVar[tuple[str, ...]] = ("SimpleITK", "numpy")

    def apply(self, case: CaseVolumes) -> tuple[CaseVolumes, dict[str, Any]]:
        """Transform the case; return it with what the step measured (recorded as ``details``)."""
        raise NotImplementedError

    def arguments(self) -> dict[str, Any]:
        """The step's arguments as plain JSON values."""
        return _plain(dataclasses.asdict(self))

    def record(self, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """This step's entry in a case history."""
        return {
            "step": self.name,
            "args": self.arguments(),
            "libraries": {lib: library_version(lib) for lib in self.libraries},
            "details": _plain(dict(details or {})),
        }

    def __call__(self, case: CaseVolumes) -> CaseVolumes:
        out, details = self.apply(case)
        return out.replace(history=(*case.history, self.record(details)))


STEP_TYPES: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make a step replayable from its recorded name."""
    STEP_TYPES[cls.name] = cls
    return cls


def steps_from_history(history: Sequence[Mapping[str, Any]]) -> list[Step]:
    """Rebuild the steps of a recorded history (its ``steps`` list), to replay them on the same inputs."""
    steps = []
    for i, rec in enumerate(history):
        cls = STEP_TYPES.get(str(rec.get("step")))
        if cls is None:
            raise ConfigError("history", f"entry {i} names unknown step {rec.get('step')!r}",
                              f"use one of {sorted(STEP_TYPES)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        args = {}
        for key, value in dict(rec.get("args", {})).items():
            if key not in fields:
                raise ConfigError("history", f"entry {i} ({cls.name}) has unknown argument {key!r}",
                                  "replay with the fedbiopsy version that wrote the history")
            args[key] = _as_tuple(value)
        steps.append(cls(**args))
    return steps


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_tuple(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    """Tuples to lists and numpy scalars to Python numbers, recursively (for JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """Whether two images share size, spacing, origin and direction."""
    from common.imageio import geometry_mismatches

    return not geometry_mismatches(a, b, tol)


def as_float(image: sitk.Image) -> sitk.Image:
    """The image as 32-bit float."""
    return sitk.Cast(image, sitk.sitkFloat32) if image.GetPixelID() != sitk.sitkFloat32 else image


__all__ = ["STEP_TYPES", "CaseVolumes", "Step", "as_float", "library_version", "register_step",
           "same_grid", "steps_from_history"]
