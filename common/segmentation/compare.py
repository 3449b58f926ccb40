"""Agreement between two sets of masks (e.g. automatic vs radiologist, radiologist vs radiologist).

Masks are matched by file name (``<case>.nii.gz``, ``.nii``, ``.nrrd``, ...); A is the reference. Each case
is scored with :func:`common.segmentation.metrics.case_metrics` (the AUC of a binary mask is its balanced
accuracy) and the metrics are summarised as median, IQR, mean and SD, as in the seed's variability tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from common.errors import SiteDataError
from common.imageio import IMAGE_SUFFIXES, read_image
from common.segmentation.metrics import case_metrics, summarise_cases


def _stem(path: Path) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def mask_files(folder: Path) -> dict[str, Path]:
    """Case id -> mask file in ``folder``."""
    if not Path(folder).is_dir():
        raise SiteDataError(folder, "is not a folder of masks", "give a folder holding <case>.nii.gz files")
    out: dict[str, Path] = {}
    for p in sorted(Path(folder).iterdir()):
        stem = _stem(p) if p.is_file() else None
        if stem is not None:
            out.setdefault(stem, p)
    return out


@dataclass
class MaskComparison:
    """Per-case metrics, their summary, and the cases found on one side only."""

    per_case: dict[str, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)


def compare_mask_dirs(a_dir: Path, b_dir: Path) -> MaskComparison:
    """Score every mask of ``b_dir`` against the same case's mask in ``a_dir`` (the reference)."""
    a, b = mask_files(a_dir), mask_files(b_dir)
    result = MaskComparison(only_a=sorted(set(a) - set(b)), only_b=sorted(set(b) - set(a)))
    for case in sorted(set(a) & set(b)):
        ref_img = read_image(a[case])
        other = read_image(b[case])
        ref = sitk.GetArrayFromImage(ref_img)
        arr = sitk.GetArrayFromImage(other)
        if ref.shape != arr.shape:
            raise SiteDataError(b[case], f"shape {arr.shape} differs from the reference's {ref.shape} "
                                f"({a[case]})", "resample both masks onto one grid")
        spacing = tuple(float(s) for s in reversed(ref_img.GetSpacing()))
        result.per_case[case] = case_metrics(ref > 0, arr > 0, None, spacing)
    if not result.per_case:
        raise SiteDataError(b_dir, f"no case in common with {a_dir}", "name each case's masks alike in both folders")
    result.summary = summarise_cases(list(result.per_case.values()))
    return result


def as_rows(summary: dict[str, dict[str, float]]) -> list[dict[str, float | str]]:
    """The summary as table rows: metric, n, median, IQR (q25, q75), mean, SD."""
    rows: list[dict[str, float | str]] = []
    for metric, s in summary.items():
        rows.append({"metric": metric, "n": s["n"], "median": s["median"], "q25": s["q25"], "q75": s["q75"],
                     "iqr": s["q75"] - s["q25"], "mean": s["mean"], "sd": s["sd"]})
    return rows
