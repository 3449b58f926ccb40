"""The images the imaging phases read: the site's preprocessed cases on the plan's grid, or its raw cases.

A study that runs the preprocessing phase (:func:`common.preprocessing.imaging_inputs`) has every site write
``derived/preprocessed/`` (a valid site folder: images and masks resampled onto the plan's target spacing,
masks by nearest neighbour). Segmentation, inference, radiomics and the image classifier then read those
cases, never the raw ones: :func:`imaging_site` is the site with its cases' image and mask paths pointing
there (its root, policy and ledgers stay the site's own). A study without the preprocessing phase reads the
raw cases and says so (``inputs: "raw"``).

The preprocessed folder must be this study's: its ``preprocessing.json`` names the sha256 of the plan the
server delivered for this study (``derived/plan.json``). A missing, stale or foreign folder is refused with
the fix, never silently replaced by the raw images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from client.sitecache import load_site_cached
from client.steps.base import work_dir
from common.config import StudyConfig
from common.errors import ProtocolError, SiteDataError
from common.hashing import sha256_file, sha256_file_cached
from common.plan import PreprocessingPlan, parse_plan
from common.preprocessing import PREPROCESSED, RAW, imaging_inputs
from common.sitedata import Case, Site

log = logging.getLogger(__name__)
PLAN_FILE = "plan.json"
PREPROCESSED_DIR = "preprocessed"
PREDICTED_DIR = "predicted_masks"
RERUN = "run the study's preprocessing phase at this site first (its apply round writes derived/preprocessed/)"


@dataclass(frozen=True)
class ImagingInputs:
    """The cases an imaging phase reads, and on which grid."""

    kind: str  # "preprocessed" | "raw"
    site: Site  # the site with its cases' paths on that grid (root, config and policy unchanged)
    raw: Site  # the site as loaded (native grids; for writing results back where the site expects them)
    grid_spacing: tuple[float, float, float] | None  # (x, y, z) mm of the plan; None for raw inputs
    plan_sha256: str | None

    @property
    def predicted_dir(self) -> Path:
        """Where the inference phase keeps the federated model's masks on this grid: ``derived/predicted_masks/``
        on the native grids (always written, for the site's own use), ``derived/predicted_masks/plan-<sha>/`` on
        a preprocessing plan's grid."""
        native = self.raw.root / "derived" / PREDICTED_DIR
        return native if self.plan_sha256 is None else native / f"plan-{self.plan_sha256[:16]}"

    def with_predicted_masks(self) -> list[Case]:
        """The input cases, those without a radiologist's mask given the federated model's where it made one."""
        cases = []
        for case in self.site.cases:
            predicted = self.predicted_dir / f"{case.patient_id}.nii.gz"
            cases.append(replace(case, mask=predicted) if case.mask is None and predicted.is_file() else case)
        return cases


def preprocessed_dir(site: Site) -> Path:
    """Where the preprocessing phase writes the site's preprocessed cases."""
    return site.root / "derived" / PREPROCESSED_DIR


def _stored_plan(site: Site, study: StudyConfig) -> tuple[PreprocessingPlan, str]:
    path = work_dir(site) / PLAN_FILE
    if not path.is_file():
        raise SiteDataError(path, "the study reads preprocessed images but the site holds no plan", RERUN)
    plan = parse_plan(path.read_text(encoding="utf-8"), path)
    if plan.study_hash != study.hash:
        raise SiteDataError(path, "the stored plan belongs to another study", RERUN)
    return plan, sha256_file(path)


def _check_fresh(folder: Path, case: Case, sequences: tuple[str, ...]) -> None:
    """A preprocessed case must have been made from the raw files as they are now (its history's input hashes)."""
    history = json.loads((folder / "histories" / f"{case.patient_id}.json").read_text(encoding="utf-8"))
    recorded = {k: v.get("sha256") for k, v in history.get("inputs", {}).items()}
    current = {s: case.images[s] for s in sequences}
    if case.mask is not None:
        current["mask"] = case.mask
    for key, path in current.items():
        if recorded.get(key) != sha256_file_cached(path):
            raise SiteDataError(folder, "a case's raw image or mask changed after it was preprocessed", RERUN)


def raw_inputs(site: Site) -> ImagingInputs:
    """The site's own cases on their native grids."""
    return ImagingInputs(RAW, site, site, None, None)


def inputs_plan_sha256(site: Site, study: StudyConfig) -> str | None:
    """The sha256 of the preprocessing plan whose grid the study's imaging phases read (None on raw inputs);
    reads only the stored plan, so it may be asked of a site whose cases were already swapped for its inputs."""
    if imaging_inputs(study) == RAW:
        return None
    return _stored_plan(site, study)[1]


def load_imaging_inputs(site: Site, study: StudyConfig) -> ImagingInputs:
    """The study's imaging inputs at this site (see the module docstring)."""
    if imaging_inputs(study) == RAW:
        return raw_inputs(site)
    plan, plan_sha = _stored_plan(site, study)
    folder = preprocessed_dir(site)
    summary_path = folder / "preprocessing.json"
    if not summary_path.is_file():
        raise SiteDataError(folder, "the preprocessed cases are missing", RERUN)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if summary.get("plan_sha256") != plan_sha:
        raise SiteDataError(folder, "the preprocessed cases were made with another plan than this study's", RERUN)
    processed = {c.patient_id: c for c in load_site_cached(folder).cases}
    cases = []
    for case in site.cases:
        done = processed.get(case.patient_id)
        if done is None:
            continue  # failed preprocessing (preprocessing.json says why) or joined later
        if case.mask is not None and done.mask is None:
            raise SiteDataError(folder, "a case has a radiologist's mask that its preprocessed copy lacks (the mask "
                                "was added after preprocessing)", RERUN)
        _check_fresh(folder, case, study.channels)
        mask = done.mask if case.mask is not None else None
        cases.append(replace(case, images={s: done.images[s] for s in study.channels}, mask=mask))
    if len(cases) < len(site.cases):
        log.warning("site %s: %d of %d case(s) have no preprocessed images and take no part (see %s)",
                    site.site_id, len(site.cases) - len(cases), len(site.cases), summary_path)
    return ImagingInputs(PREPROCESSED, replace(site, cases=tuple(cases)), site, plan.target_spacing, plan_sha)


def check_plan_grid(inputs: ImagingInputs, target_spacing_zyx: object) -> None:
    """A segmentation plan's ``target_spacing`` (array order z, y, x) must be the grid of the site's preprocessed
    inputs: a model planned for another spacing would see every structure at the wrong size."""
    if inputs.grid_spacing is None:
        return
    try:
        planned = [float(v) for v in reversed(list(target_spacing_zyx))]  # type: ignore[call-overload]
    except (TypeError, ValueError):
        planned = []
    if len(planned) != 3 or any(abs(a - b) > 1e-4 * max(1.0, abs(b))
                                for a, b in zip(planned, inputs.grid_spacing, strict=True)):
        raise ProtocolError(inputs.site.site_id, "the segmentation plan's target spacing is not the grid of the "
                            "study's preprocessing plan", "build the segmentation plan on the preprocessing "
                            "plan's target spacing (this fedbiopsy version's server does)")


def check_feature_inputs(site: Site, study: StudyConfig) -> None:
    """The site's radiomics (``derived/features.json``, and every table derived from them) must have been computed
    on this study's imaging inputs: a raw-grid table must not feed a study that preprocesses, nor one of another
    plan. Tables without that record (written before it existed, or by hand) pass."""
    sidecar = work_dir(site) / "features.json"
    if not sidecar.is_file():
        return
    recorded = json.loads(sidecar.read_text(encoding="utf-8"))
    if "inputs" not in recorded:
        return
    kind, plan_sha = imaging_inputs(study), inputs_plan_sha256(site, study)
    if recorded.get("inputs") != kind or recorded.get("plan_sha256") != plan_sha:
        raise SiteDataError(sidecar, f"the site's features were computed on {recorded.get('inputs')} images of "
                            f"another plan than this study's {kind} inputs",
                            "run this study's features phase (after its preprocessing phase) first")


def imaging_site(site: Site, study: StudyConfig) -> Site:
    """The site whose cases are the study's imaging inputs (:func:`load_imaging_inputs`)."""
    return load_imaging_inputs(site, study).site


__all__ = ["PREPROCESSED", "RAW", "ImagingInputs", "check_feature_inputs", "check_plan_grid", "imaging_site",
           "inputs_plan_sha256", "load_imaging_inputs", "preprocessed_dir", "raw_inputs"]
