"""Reading and writing medical images with SimpleITK, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.errors import SiteDataError

IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def find_image(folder: Path, stem: str) -> Path | None:
    """The first ``folder/stem<suffix>`` that exists, in the order of :data:`IMAGE_SUFFIXES`."""
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_image(path: Path | str) -> sitk.Image:
    """Read one image; a file SimpleITK cannot read becomes a :class:`SiteDataError`."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise SiteDataError(
            path, f"cannot be read as an image ({first})", "re-export it as NIfTI (.nii.gz) or NRRD"
        ) from exc


def write_image(image: sitk.Image, path: Path | str, compress: bool = True) -> None:
    """Write one image, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=compress)


def array_to_image(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction: tuple[float, ...] | None = None,
) -> sitk.Image:
    """A SimpleITK image from a (z, y, x) array with spacing and origin given in (x, y, z) order."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        image.SetDirection(direction)
    return image


def geometry(image: sitk.Image) -> dict[str, tuple[float, ...]]:
    """Size, spacing, origin and direction of an image, for comparisons and reports."""
    return {
        "size": tuple(float(s) for s in image.GetSize()),
        "spacing": tuple(image.GetSpacing()),
        "origin": tuple(image.GetOrigin()),
        "direction": tuple(image.GetDirection()),
    }


def geometry_mismatches(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> list[str]:
    """The names of the geometry fields (size, spacing, origin, direction) in which two images differ."""
    ga, gb = geometry(a), geometry(b)
    out = []
    for key in ("size", "spacing", "origin", "direction"):
        va, vb = np.asarray(ga[key]), np.asarray(gb[key])
        if va.shape != vb.shape or not np.allclose(va, vb, atol=tol, rtol=0):
            out.append(f"{key} {tuple(np.round(va, 4))} vs {tuple(np.round(vb, 4))}")
    return out
