"""The site's parametric maps: ADC (and IVIM) from DWI, Tofts parameters and curve features from DCE.

``derived/maps/<pid>/<MAP>.nii.gz`` holds each case's maps, fitted on the series' own grid, then (``maps.align``)
registered rigidly to the reference sequence (the b0 volume or the DCE baseline against it, Mattes MI) and
resampled onto its grid, so that every channel of a case shares the mask's geometry. ``derived/maps/maps.json``
records per case the input files' sha256, the settings, the maps written, and the problem of a case that failed
(which leaves that case out; the others go on). A case whose inputs and settings are unchanged is not refitted,
nor is a case whose data was at fault; a case whose fit raised an unexpected error is tried again.

:func:`ensure_site_maps` is what the imaging phases call: the site with each case's map paths added to its
images. It is also ``fedbiopsy maps SITE_DIR``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from common.config import StudyConfig
from common.config_maps import MapsConfig
from common.errors import FedBiopsyError, FileProblemError, SiteDataError
from common.hashing import sha256_file_cached, sha256_json
from common.imageio import find_image, read_image, write_image
from common.maps.dce import aif_blood, concentration, curve_features, fit_tofts
from common.maps.dwi import fit_adc, fit_ivim
from common.maps.layout import (
    DCE,
    DWI,
    IVIM_MAPS,
    MAPS_DIR,
    MIN_IVIM_BVALUES,
    T10_MAP,
    bval_path,
    check_volume_count,
    read_bvals,
    read_sidecar,
    sidecar_path,
)
from common.sitedata import Case, Site

log = logging.getLogger(__name__)
SUMMARY = "maps.json"
FORMAT = "fedbiopsy-maps/1"


@dataclass
class CaseMaps:
    """What the maps step did for one case."""

    patient_id: str
    maps: dict[str, Path] = field(default_factory=dict)
    problem: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    retry: bool = False  # the problem was an unexpected error, not the data's: fit again next time


def maps_dir(site_root: Path) -> Path:
    """``derived/maps/`` of a site."""
    return Path(site_root) / "derived" / MAPS_DIR


def series_volumes(image: sitk.Image, path: Path, what: str) -> tuple[np.ndarray, sitk.Image]:
    """A 4D series as (volume, z, y, x) float64 and its first volume (the 3D grid of the maps)."""
    if image.GetDimension() != 4:
        raise SiteDataError(path, f"the {what} series is {image.GetDimension()}D, not 4D (one volume per "
                            f"{'b-value' if what == DWI else 'time point'})",
                            "export the whole series as one 4D NIfTI, or list it as a 3D sequence")
    size = list(image.GetSize())
    first = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
    return sitk.GetArrayFromImage(image).astype(np.float64), first


def _foreground(volume: np.ndarray, fraction: float) -> np.ndarray:
    positive = volume[volume > 0]
    if positive.size == 0:
        return np.zeros(volume.shape, dtype=bool)
    return volume > fraction * float(np.percentile(positive, 99))


def _to_image(values: np.ndarray, fg: np.ndarray, grid: sitk.Image) -> sitk.Image:
    arr = np.zeros(fg.shape, dtype=np.float32)
    arr[fg] = values.astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(grid)
    return image


def dwi_maps(path: Path, names: tuple[str, ...], cfg: MapsConfig) -> tuple[dict[str, sitk.Image], sitk.Image]:
    """The DWI maps ``names`` of one series, and its b0 volume (the registration anchor)."""
    bvals = read_bvals(bval_path(path))
    data, grid = series_volumes(read_image(path), path, DWI)
    check_volume_count(path, DWI, data.shape[0], len(bvals), DWI + ".bval")
    b = np.asarray(bvals)
    b0 = data[b == b.min()].mean(axis=0)
    fg = _foreground(b0, cfg.foreground_fraction)
    signal = data[:, fg].T
    out: dict[str, np.ndarray] = {}
    if "ADC" in names:
        out["ADC"] = fit_adc(signal, bvals)[0]
    if any(n in IVIM_MAPS for n in names):
        if len(set(bvals)) < MIN_IVIM_BVALUES or min(bvals) > 0:
            raise SiteDataError(bval_path(path), f"IVIM needs a b=0 volume and at least {MIN_IVIM_BVALUES} distinct "
                                "b-values", "acquire more b-values, or leave IVIM maps out of the study")
        out.update(fit_ivim(signal, bvals))
    anchor = sitk.GetImageFromArray(b0.astype(np.float32))
    anchor.CopyInformation(grid)
    return {n: _to_image(out[n], fg, grid) for n in names}, anchor


def dce_maps(path: Path, names: tuple[str, ...], cfg: MapsConfig) -> tuple[dict[str, sitk.Image], sitk.Image]:
    """The DCE maps ``names`` of one series, and its baseline mean (the registration anchor)."""
    sidecar = read_sidecar(sidecar_path(path))
    data, grid = series_volumes(read_image(path), path, DCE)
    times = sidecar.AcquisitionTimes_s
    check_volume_count(path, DCE, data.shape[0], len(times), "DCE.json AcquisitionTimes_s")
    baseline = data[: sidecar.BaselineVolumes].mean(axis=0)
    fg = _foreground(baseline, cfg.foreground_fraction)
    if sidecar.T10_s is not None:
        t10: np.ndarray | float = float(sidecar.T10_s)
    else:
        t10_path = find_image(path.parent, T10_MAP)
        if t10_path is None:
            raise SiteDataError(sidecar_path(path), "no native T1: the sidecar has no T10_s and there is no "
                                "T10.nii.gz beside the series", "add T10_s (s) to DCE.json or a T10 map")
        t10_arr = sitk.GetArrayFromImage(read_image(t10_path)).astype(np.float64)
        if t10_arr.shape != baseline.shape:
            raise SiteDataError(t10_path, "the T10 map is not on the DCE series' grid",
                                "resample it onto the DCE grid")
        t10 = t10_arr[fg]
    signal = data[:, fg].T
    conc = concentration(signal, sidecar, t10)
    extended = cfg.tofts == "extended" or "vp" in names
    out = fit_tofts(conc, times, aif_blood(times, sidecar), sidecar.Hematocrit, extended=extended)
    out.update(curve_features(signal, conc, times, sidecar))
    anchor = sitk.GetImageFromArray(baseline.astype(np.float32))
    anchor.CopyInformation(grid)
    return {n: _to_image(out[n], fg, grid) for n in names}, anchor


def _align(maps: dict[str, sitk.Image], anchor: sitk.Image, reference: sitk.Image, cfg: MapsConfig,
           seed: int) -> dict[str, sitk.Image]:
    from client.preprocessing.register import register_rigid
    from client.preprocessing.resample import resample_onto

    if cfg.align:
        transform, _ = register_rigid(reference, anchor, seed=max(1, seed))
    else:
        transform = sitk.Euler3DTransform()
    return {n: resample_onto(m, reference, "linear", transform) for n, m in maps.items()}


def settings_hash(study: StudyConfig) -> str:
    """What the maps depend on besides their inputs: the maps section and the reference sequence."""
    return sha256_json({"maps": study.maps.model_dump(mode="json"), "reference": study.reference_sequence,
                        "format": FORMAT})


def _inputs(case: Case, study: StudyConfig) -> dict[str, Path]:
    files: dict[str, Path] = {study.reference_sequence: case.images[study.reference_sequence]}
    if DWI in study.four_d:
        files[DWI] = case.images[DWI]
        files[DWI + ".bval"] = bval_path(case.images[DWI])
    if DCE in study.four_d:
        files[DCE] = case.images[DCE]
        files[DCE + ".json"] = sidecar_path(case.images[DCE])
        t10 = find_image(case.images[DCE].parent, T10_MAP)
        if t10 is not None:
            files[T10_MAP] = t10
    return files


def case_maps(case: Case, study: StudyConfig, out_dir: Path) -> CaseMaps:
    """Fit, align and write one case's maps; a problem with its inputs is recorded, never raised."""
    result = CaseMaps(case.patient_id)
    try:
        missing = [s for s in (study.reference_sequence, *study.four_d) if s not in case.images]
        if missing:
            raise SiteDataError(out_dir, f"the case lacks sequence(s) {missing}", "add them to the case")
        files = _inputs(case, study)
        result.inputs = {k: sha256_file_cached(p) for k, p in files.items() if Path(p).is_file()}
        reference = read_image(case.images[study.reference_sequence])
        written: dict[str, Path] = {}
        for seq, fit in ((DWI, dwi_maps), (DCE, dce_maps)):
            if seq not in study.four_d:
                continue
            maps, anchor = fit(case.images[seq], study.maps.of(seq), study.maps)
            for name, image in _align(maps, anchor, reference, study.maps, study.seed + 1).items():
                target = out_dir / case.patient_id / f"{name}.nii.gz"
                write_image(sitk.Cast(image, sitk.sitkFloat32), target)
                written[name] = target
        result.maps = written
    except FileProblemError as err:
        result.problem = f"{Path(err.path).name}: {err.problem}. Fix: {err.fix}"
    except FedBiopsyError as err:
        result.problem = str(err)
    except Exception as err:  # noqa: BLE001 - one case's fit (dipy, SimpleITK, LAPACK) never stops the cohort
        log.exception("site maps: case %s failed", case.patient_id)
        result.problem = f"the fit failed ({type(err).__name__}: {err}). Fix: check the case's 4D series"
        result.retry = True
    return result


def _read_summary(folder: Path) -> dict[str, Any]:
    path = folder / SUMMARY
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError):
        return {}


def _fresh(entry: dict[str, Any], case: Case, settings: str, study: StudyConfig, folder: Path) -> bool:
    """Whether a case's recorded result (its maps, or its problem) still holds: same inputs, same settings."""
    if not entry or entry.get("settings") != settings or entry.get("retry"):
        return False
    try:
        files = _inputs(case, study)
    except KeyError:
        return False
    current = {k: sha256_file_cached(p) for k, p in files.items() if Path(p).is_file()}
    maps_present = all((folder / case.patient_id / f"{n}.nii.gz").is_file() for n in entry.get("maps", []))
    return bool(current == entry.get("inputs") and maps_present)


def compute_site_maps(site: Site, study: StudyConfig, progress: bool = False) -> list[CaseMaps]:
    """Every case's maps (refitting only cases whose inputs or settings changed); writes ``maps.json``."""
    folder = maps_dir(site.root)
    summary = _read_summary(folder)
    previous = summary.get("cases", {}) if summary.get("format") == FORMAT else {}
    results: list[CaseMaps] = []
    cases = list(site.cases)
    iterator: Any = cases
    if progress:
        from rich.progress import track

        iterator = track(cases, description=f"Fitting maps at {site.site_id}")
    settings = settings_hash(study)
    fitted = 0
    for case in iterator:
        entry = previous.get(case.patient_id, {})
        if _fresh(entry, case, settings, study, folder):
            results.append(CaseMaps(case.patient_id, {n: folder / case.patient_id / f"{n}.nii.gz"
                                                      for n in entry["maps"]}, entry.get("problem"), entry["inputs"]))
            continue
        result = case_maps(case, study, folder)
        fitted += 1
        if result.problem:
            log.warning("site %s: case %s has no maps and takes no part: %s", site.site_id, case.patient_id,
                        result.problem)
        results.append(result)
    if fitted or set(previous) != {r.patient_id for r in results}:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SUMMARY).write_text(json.dumps({
            "format": FORMAT, "settings": settings, "sequences": list(study.four_d),
            "maps": {s: list(study.maps.of(s)) for s in study.four_d},
            "cases": {r.patient_id: {"maps": sorted(r.maps), "inputs": r.inputs, "problem": r.problem,
                                     "retry": r.retry, "settings": settings} for r in results},
        }, indent=1, sort_keys=True), encoding="utf-8")
    return results


def site_with_maps(site: Site, study: StudyConfig) -> tuple[Site, dict[str, str]]:
    """The site with each case's maps among its images, and the problem of each case left out for want of its
    maps; a study without 4D sequences gets the site unchanged."""
    if not study.four_d:
        return site, {}
    results = {r.patient_id: r for r in compute_site_maps(site, study)}
    cases = [replace(c, images={**c.images, **results[c.patient_id].maps}) for c in site.cases
             if results[c.patient_id].problem is None]
    problems = {pid: str(r.problem) for pid, r in results.items() if r.problem is not None}
    return replace(site, cases=tuple(cases)), problems


def ensure_site_maps(site: Site, study: StudyConfig) -> Site:
    """The site with each case's maps among its images (:func:`site_with_maps`, the cases without them left out)."""
    return site_with_maps(site, study)[0]


__all__ = ["CaseMaps", "case_maps", "compute_site_maps", "dce_maps", "dwi_maps", "ensure_site_maps", "maps_dir",
           "series_volumes", "settings_hash", "site_with_maps"]
