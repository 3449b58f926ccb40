"""Checks a site's cohort case by case; one bad case never stops the others.

Every problem names the file at fault and the fix. :func:`validate_site` reports; :func:`load_site`
returns the valid cases only (and logs the rest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from common.config import StudyConfig
from common.errors import ConfigError, FedBiopsyError, FileProblemError, SiteDataError
from common.imageio import find_image, geometry_mismatches, read_image
from common.maps.layout import (
    DCE,
    DWI,
    FOUR_D,
    T10_MAP,
    bval_path,
    check_volume_count,
    read_bvals,
    read_sidecar,
    sidecar_path,
)
from common.sitedata import (
    CLINICAL_COLUMNS,
    Case,
    Site,
    SiteConfig,
    case_paths,
    load_site_config,
    read_clinical,
)

log = logging.getLogger(__name__)
DEFAULT_SEQUENCES: tuple[str, ...] = ("T2w", "CET1")
TABULAR_COLUMNS: tuple[str, ...] = ("patient_id",)  # all a tabular site's clinical.csv must have


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    path: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}. Fix: {self.fix}"


@dataclass
class CaseReport:
    """The verdict on one patient."""

    patient_id: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass
class SiteReport:
    """The verdict on a whole site directory."""

    root: Path
    config: SiteConfig | None
    site_problems: list[Problem] = field(default_factory=list)
    cases: list[CaseReport] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.site_problems and all(c.valid for c in self.cases)

    @property
    def n_invalid(self) -> int:
        return sum(not c.valid for c in self.cases)


def _problem(err: FedBiopsyError) -> Problem:
    if isinstance(err, FileProblemError):
        return Problem(err.path, err.problem, err.fix)
    return Problem("", str(err), "")


def _check_image(path: Path, what: str) -> tuple[sitk.Image | None, list[Problem]]:
    """Read an image and check it is 3D with finite voxels."""
    try:
        image = read_image(path)
    except SiteDataError as err:
        return None, [_problem(err)]
    problems = []
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        problems.append(Problem(
            str(path), f"{what} is {image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} "
            "component(s), not a 3D scalar volume", "export one 3D volume per file (split 4D series)",
        ))
        return None, problems
    bad = _nonfinite_voxels(path, image)
    if bad:
        problems.append(Problem(
            str(path), f"{what} has {bad} NaN/inf voxel(s)", "re-export the series or fill the voxels"
        ))
    return image, problems


def _check_series(path: Path, seq: str) -> list[Problem]:
    """A 4D series (DWI, DCE): 4D, finite, with its b-values or sidecar matching its volumes."""
    try:
        image = read_image(path)
    except SiteDataError as err:
        return [_problem(err)]
    if image.GetDimension() != 4 or image.GetNumberOfComponentsPerPixel() != 1:
        what = "b-value" if seq == DWI else "time point"
        return [Problem(str(path), f"sequence {seq} is {image.GetDimension()}D, not a 4D series",
                        f"export the whole series as one 4D NIfTI (one volume per {what})")]
    n_volumes = int(image.GetSize()[3])
    try:
        if seq == DWI:
            check_volume_count(path, DWI, n_volumes, len(read_bvals(bval_path(path))), "DWI.bval")
        else:
            sidecar = read_sidecar(sidecar_path(path))
            check_volume_count(path, DCE, n_volumes, len(sidecar.AcquisitionTimes_s), "DCE.json AcquisitionTimes_s")
            if sidecar.T10_s is None and find_image(path.parent, T10_MAP) is None:
                raise SiteDataError(sidecar_path(path), "no native T1: no T10_s and no T10.nii.gz beside the series",
                                    "add T10_s (s) to DCE.json or a T10 map on the DCE grid")
    except SiteDataError as err:
        return [_problem(err)]
    bad = _nonfinite_voxels(path, image)
    if bad:
        return [Problem(str(path), f"sequence {seq} has {bad} NaN/inf voxel(s)", "re-export the series")]
    return []


def _nonfinite_voxels(path: Path, image: sitk.Image) -> int:
    """Count NaN/inf voxels. SimpleITK's NIfTI reader turns NaN into 0, so NIfTI data is read with nibabel."""
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        array = np.asanyarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]
    else:
        array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(np.count_nonzero(~np.isfinite(array)))


def validate_case(site_dir: Path, patient_id: str, config: SiteConfig | None) -> CaseReport:
    """Check one case's images and mask; never raises on bad data."""
    sequences = config.sequences if config else DEFAULT_SEQUENCES
    reference = config.reference_sequence if config else sequences[0]
    report = CaseReport(patient_id)
    images, mask_path = case_paths(site_dir, patient_id, sequences)
    loaded: dict[str, sitk.Image] = {}
    for seq, path in images.items():
        if path is None:
            report.problems.append(Problem(
                str(site_dir / "images" / patient_id / f"{seq}.nii.gz"), f"sequence {seq} is missing",
                f"add the {seq} volume or remove the patient from clinical.csv",
            ))
            continue
        if seq in FOUR_D:
            report.problems.extend(_check_series(path, seq))
            continue
        image, problems = _check_image(path, f"sequence {seq}")
        report.problems.extend(problems)
        if image is not None:
            loaded[seq] = image
    if mask_path is None:
        report.warnings.append(Problem(
            str(site_dir / "masks" / f"{patient_id}.nii.gz"), "no tumour mask",
            "none needed for segmentation by the federated model; add one to train on this case",
        ))
        return report
    mask, problems = _check_image(mask_path, "mask")
    report.problems.extend(problems)
    if mask is None:
        return report
    mask_array = sitk.GetArrayViewFromImage(mask)
    if not np.any(mask_array):
        report.problems.append(Problem(str(mask_path), "mask is empty (no tumour voxel)",
                                       "redraw the tumour or delete the mask file"))
    elif not np.array_equal(mask_array, np.round(mask_array)) or mask_array.min() < 0:
        report.problems.append(Problem(str(mask_path), "mask holds non-integer or negative labels",
                                       "save the mask with integer labels (0 = background)"))
    ref = loaded.get(reference)
    if ref is not None:
        mismatches = geometry_mismatches(mask, ref)
        if mismatches:
            report.problems.append(Problem(
                str(mask_path), f"geometry differs from {reference}: " + "; ".join(mismatches),
                f"resample the mask onto the {reference} grid (nearest neighbour) or re-export both",
            ))
    return report


def validate_site(site_dir: Path | str) -> SiteReport:
    """Validate ``site.yaml``, ``clinical.csv`` and every case; collects all problems."""
    root = Path(site_dir)
    report = SiteReport(root=root, config=None)
    if not root.is_dir():
        report.site_problems.append(Problem(str(root), "site directory does not exist", "give an existing folder"))
        return report
    try:
        report.config = load_site_config(root)
    except ConfigError as err:
        report.site_problems.append(_problem(err))
    tabular = report.config is not None and not report.config.sequences
    try:
        clinical_ids = list(read_clinical(root, TABULAR_COLUMNS if tabular else CLINICAL_COLUMNS)["patient_id"])
    except ConfigError as err:
        report.site_problems.append(_problem(err))
        clinical_ids = []
    if tabular:  # site.yaml + clinical.csv: a case per row; its columns are checked against a study
        report.cases = [CaseReport(str(pid)) for pid in sorted(map(str, clinical_ids))]
        return report
    image_root = root / "images"
    image_ids = sorted(p.name for p in image_root.iterdir() if p.is_dir()) if image_root.is_dir() else []
    for pid in sorted(set(image_ids) - set(clinical_ids)):
        cr = CaseReport(pid)
        cr.problems.append(Problem(str(root / "clinical.csv"), f"patient {pid} has images but no clinical row",
                                   f"add a row for {pid} to clinical.csv or remove images/{pid}"))
        report.cases.append(cr)
    for pid in clinical_ids:
        if pid not in image_ids:
            cr = CaseReport(pid)
            cr.problems.append(Problem(str(image_root / pid), f"patient {pid} is in clinical.csv but has no images",
                                       f"add images/{pid}/ or remove the row from clinical.csv"))
            report.cases.append(cr)
            continue
        report.cases.append(validate_case(root, pid, report.config))
    report.cases.sort(key=lambda c: c.patient_id)
    return report


def load_site(site_dir: Path | str) -> Site:
    """Load a site with its valid cases; site-level problems raise, invalid cases are logged and left out."""
    root = Path(site_dir)
    config = load_site_config(root)
    clinical = read_clinical(root, CLINICAL_COLUMNS if config.sequences else TABULAR_COLUMNS
                             ).set_index("patient_id", drop=False)
    report = validate_site(root)
    cases = []
    for cr in report.cases:
        if not cr.valid:
            for p in cr.problems:
                log.warning("site %s: case %s left out: %s", config.site_id, cr.patient_id, p)
            continue
        images, mask = case_paths(root, cr.patient_id, config.sequences) if config.sequences else ({}, None)
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in clinical.loc[cr.patient_id].items()}
        cases.append(Case(cr.patient_id, {k: v for k, v in images.items() if v is not None}, mask, row))
    return Site(root=root, config=config, cases=tuple(cases))


def validate_study_columns(site_dir: Path | str, study: StudyConfig) -> tuple[list[Problem], list[Problem]]:
    """The site's ``clinical.csv`` (and the study's feature table, where it names one and the site has it)
    against the study's prognosis columns and the site's policy: (problems, warnings). Each names the column
    and a row count, never a value."""
    from common.tabular import check_columns

    root = Path(site_dir)
    problems: list[Problem] = []
    warnings: list[Problem] = []
    if "prognosis" not in study.phases:
        return problems, warnings
    cfg = study.prognosis
    clinical_path = root / "clinical.csv"
    try:
        config = load_site_config(root)
        frame = read_clinical(root, TABULAR_COLUMNS).set_index("patient_id")
    except ConfigError as err:
        return [_problem(err)], warnings
    source = str(clinical_path)
    clinical_cols = set(frame.columns)
    if cfg.table != "clinical.csv":
        table_path = root / "derived" / cfg.table
        if cfg.table not in config.policy.feature_tables:
            problems.append(Problem(str(root / "site.yaml"), f"the study's table {cfg.table!r} is not among the "
                                    "site's policy.feature_tables", "add it to the policy or name another"))
        elif table_path.is_file():
            table = pd.read_csv(table_path, dtype={"patient_id": str}).set_index("patient_id")
            frame = frame.join(table.drop(columns=[c for c in table.columns if c in clinical_cols]), how="inner")
            source = f"{clinical_path} + {table_path}"
        else:
            warnings.append(Problem(str(table_path), "not written yet", "the phase that writes it runs first"))
    uses = [(cfg.duration, "survival"), (cfg.event, "survival")] + [(c, "covariate") for c in cfg.covariates
                                                                     if c in clinical_cols]
    if cfg.split_column:
        uses.append((cfg.split_column, "split"))
    for col, use in uses:
        spec = config.policy.columns.get(col)
        if spec is None or use not in spec.uses:
            problems.append(Problem(str(root / "site.yaml"), f"column {col!r} is not allowed as {use} by "
                                    "policy.columns", f"list it under policy.columns with use {use}, or drop it "
                                    "from the study"))
    for p in check_columns(frame, cfg):
        (problems if p.fatal else warnings).append(Problem(source, p.what, p.fix))
    return problems, warnings
