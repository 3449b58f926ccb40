"""A case's preprocessing pipeline, configured from the study's ``preprocessing`` section and the global plan.

:func:`build_pipeline` turns the settings into the list of steps (normalisation last); :class:`Pipeline` runs
them on a :class:`CaseVolumes`; :func:`history_document` is the per-case provenance record (every step with
its arguments, library versions and measurements, plus the hashes of the input and output files), written as
canonical JSON by :func:`write_history`, so that the file's sha256 is what the registry stores.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from client.preprocessing.base import CaseVolumes, Step, library_version, steps_from_history
from client.preprocessing.bias import N4BiasCorrection
from client.preprocessing.denoise import NLMDenoise
from client.preprocessing.normalise import NyulStandardise, PercentileRescale, ZScoreNormalise
from client.preprocessing.register import RigidRegister
from client.preprocessing.resample import Resample
from common.config import PreprocessingConfig
from common.errors import ConfigError
from common.hashing import canonical_json, sha256_file, sha256_text
from common.imageio import read_image, write_image
from common.plan import NyulPlan
from common.sitedata import Case

HISTORY_FORMAT = "fedbiopsy-history/1"


@dataclass(frozen=True)
class Pipeline:
    """An ordered tuple of steps, itself a step-like callable on a case."""

    steps: tuple[Step, ...]

    def __call__(self, case: CaseVolumes) -> CaseVolumes:
        for step in self.steps:
            case = step(case)
        return case

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    @classmethod
    def from_history(cls, history: Mapping[str, Any]) -> Pipeline:
        """The pipeline a history document records, to replay it."""
        return cls(tuple(steps_from_history(history["steps"])))


def normalisation_step(config: PreprocessingConfig, nyul: NyulPlan | None) -> Step:
    """The normalisation step the settings choose (Nyúl needs the plan's landmarks)."""
    cfg = config.normalise
    if cfg.method == "zscore":
        return ZScoreNormalise()
    if cfg.method == "percentile":
        return PercentileRescale(cfg.percentile_range, cfg.output_range)
    if nyul is None:
        raise ConfigError("preprocessing.normalise", "Nyúl standardisation needs the federated landmarks",
                          "pass the plan of the preprocessing phase (--plan), or run without one to learn "
                          "site-local landmarks")
    if tuple(nyul.percentiles) != tuple(cfg.nyul_percentiles) or tuple(nyul.scale) != tuple(cfg.nyul_scale):
        raise ConfigError("plan", "the plan's Nyúl percentiles/scale differ from the study's",
                          "use the plan built with this study config")
    return NyulStandardise(tuple(nyul.percentiles), dict(nyul.landmarks))


def build_pipeline(config: PreprocessingConfig, target_spacing: Sequence[float] | None = None,
                   nyul: NyulPlan | None = None, include_normalise: bool = True) -> Pipeline:
    """The steps of ``config.steps`` in order; ``include_normalise=False`` gives the part before normalisation.

    The resampling spacing is the config's ``target_spacing`` when set, else ``target_spacing`` (the plan's).
    """
    steps: list[Step] = []
    for name in config.steps:
        if name == "denoise":
            c = config.denoise
            steps.append(NLMDenoise(c.patch_size, c.patch_distance, c.strength))
        elif name == "bias":
            b = config.bias
            steps.append(N4BiasCorrection(b.shrink_factor, tuple(b.iterations), b.convergence, b.control_points))
        elif name == "register":
            r = config.registration
            steps.append(RigidRegister(r.histogram_bins, r.sampling_fraction, r.iterations,
                                       tuple(r.shrink_factors), r.seed))
        elif name == "resample":
            spacing = config.resample.target_spacing or target_spacing
            if spacing is None:
                raise ConfigError("preprocessing.resample.target_spacing", "no target spacing",
                                  "set it in the study config or pass the plan of the preprocessing phase")
            steps.append(Resample(tuple(float(s) for s in spacing), config.resample.interpolator))  # type: ignore[arg-type]
        elif name == "normalise" and include_normalise:
            steps.append(normalisation_step(config, nyul))
    return Pipeline(tuple(steps))


def load_case(case: Case, sequences: Sequence[str], reference: str) -> CaseVolumes:
    """A site case's volumes in memory (float32 images, the mask as uint8 labels)."""
    missing = [s for s in sequences if s not in case.images]
    if missing:
        raise ConfigError(case.patient_id, f"sequence(s) {missing} missing",
                          "add them or leave the case out of the study")
    images = {s: sitk.Cast(read_image(case.images[s]), sitk.sitkFloat32) for s in sequences}
    mask = None
    if case.mask is not None:
        mask = sitk.Cast(read_image(case.mask), sitk.sitkUInt8)  # labels kept; resampled nearest-neighbour
    return CaseVolumes(case.patient_id, images, mask, reference)


def write_case(case: CaseVolumes, site_dir: Path) -> dict[str, Path]:
    """Write a case in the site layout (images/<pid>/<seq>.nii.gz, masks/<pid>.nii.gz); returns the paths."""
    paths: dict[str, Path] = {}
    for seq, image in case.images.items():
        paths[seq] = site_dir / "images" / case.patient_id / f"{seq}.nii.gz"
        write_image(sitk.Cast(image, sitk.sitkFloat32), paths[seq])
    if case.mask is not None:
        paths["mask"] = site_dir / "masks" / f"{case.patient_id}.nii.gz"
        write_image(sitk.Cast(case.mask, sitk.sitkUInt8), paths["mask"])
    return paths


def environment() -> dict[str, str]:
    """Versions of Python and of the libraries every pipeline uses."""
    return {"python": platform.python_version(), "fedbiopsy": library_version("fedbiopsy"),
            "SimpleITK": library_version("SimpleITK"), "numpy": library_version("numpy")}


def history_document(case: CaseVolumes, site_id: str, inputs: Mapping[str, Path],
                     outputs: Mapping[str, Path], plan_sha256: str | None, settings_hash: str,
                     study_hash: str | None = None) -> dict[str, Any]:
    """The per-case provenance record: inputs, steps (arguments, versions, measurements) and outputs."""
    return {
        "format": HISTORY_FORMAT,
        "site_id": site_id,
        "patient_id": case.patient_id,
        "study_hash": study_hash,
        "plan_sha256": plan_sha256,
        "settings_hash": settings_hash,
        "environment": environment(),
        "inputs": {k: {"file": Path(p).name, "sha256": sha256_file(p)} for k, p in sorted(inputs.items())},
        "steps": list(case.history),
        "outputs": {k: {"file": Path(p).name, "sha256": sha256_file(p)} for k, p in sorted(outputs.items())},
    }


def write_history(document: Mapping[str, Any], path: Path) -> str:
    """Write a history as canonical JSON; returns its sha256 (equal to the file's)."""
    text = canonical_json(document)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return sha256_text(text)


def read_history(path: Path) -> dict[str, Any]:
    """A history written by :func:`write_history`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
