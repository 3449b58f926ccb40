"""Write a 3D volume as a DICOM MR series (one file per slice) with SimpleITK, for ingest tests and demos.

Follows SimpleITK's "DICOM series from array" example: every slice carries the tags a series reader needs
(study/series UIDs, description, patient, orientation, position, instance number) plus the scanner tags
fedbiopsy's ingest reads (manufacturer, field strength, sex, age).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import SimpleITK as sitk

UID_ROOT = "1.2.826.0.1.3680043.2.1125"


def make_uid(*parts: object) -> str:
    """A deterministic DICOM UID (digits only, under 64 characters) from ``parts``."""
    return f"{UID_ROOT}.{zlib.crc32(repr(parts).encode()) % 10**9}.{zlib.adler32(repr(parts).encode()) % 10**9}"


def write_dicom_series(image: sitk.Image, folder: Path | str, description: str, patient_id: str,
                       study_uid: str | None = None, series_uid: str | None = None,
                       tags: Mapping[str, str] | None = None, skip_slices: tuple[int, ...] = (),
                       instance_offset: int = 0) -> list[Path]:
    """Write ``image`` (3D, values truncated to int16) as slices ``folder/<series>_<k>.dcm``; returns the files.

    ``tags`` add or override DICOM tags ("gggg|eeee": value) on every slice; ``skip_slices`` leaves slices
    out (to make an incomplete series).
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or make_uid("study", patient_id)
    series_uid = series_uid or make_uid("series", patient_id, description)
    direction = image.GetDirection()
    vol = sitk.Cast(sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, -32768, 32767), sitk.sitkInt16)
    common = {
        "0008|0060": "MR",
        "0008|0021": "20240101", "0008|0031": "120000",
        "0008|103e": description,
        "0010|0010": f"Anon^{patient_id}", "0010|0020": patient_id,
        "0020|000d": study_uid, "0020|000e": series_uid,
        "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                    direction[1], direction[4], direction[7])),
        "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        "0008|0070": "SIMULATED", "0018|0087": "3",
    }
    common.update(tags or {})
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    stem = series_uid.rsplit(".", 1)[-1]
    for k in range(vol.GetDepth()):
        if k in skip_slices:
            continue
        slice_k = vol[:, :, k]
        for tag, value in common.items():
            slice_k.SetMetaData(tag, value)
        position = vol.TransformIndexToPhysicalPoint((0, 0, k))
        slice_k.SetMetaData("0020|0032", "\\".join(f"{p:.6f}" for p in position))
        number = k + 1 + instance_offset
        slice_k.SetMetaData("0020|0013", str(number))
        slice_k.SetMetaData("0008|0018", f"{series_uid}.{number}")
        path = out / f"{stem}_{number:05d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_k)
        files.append(path)
    return files


def write_dicom_4d(image: sitk.Image, folder: Path | str, description: str, patient_id: str, kind: str,
                   values: Sequence[float], tags: Mapping[str, str] | None = None,
                   drop_volume_slices: Mapping[int, tuple[int, ...]] | None = None) -> list[Path]:
    """Write a 4D ``image`` as one DICOM series whose volumes repeat the slice positions: ``kind`` "b_value"
    tags each volume with DiffusionBValue (0018,9087), "time" with AcquisitionTime (0008,0032; ``values`` in s
    after 12:00:00). ``drop_volume_slices``
    leaves slices out of some volumes (an incomplete series)."""
    size = list(image.GetSize())
    series_uid = make_uid("series", patient_id, description)
    files: list[Path] = []
    for v, value in enumerate(values):
        volume = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, v])
        extra = dict(tags or {})
        if kind == "b_value":
            extra["0018|9087"] = f"{value:g}"
        else:
            seconds = 12 * 3600 + float(value)
            extra["0008|0032"] = f"{int(seconds // 3600):02d}{int(seconds % 3600 // 60):02d}{seconds % 60:09.6f}"
        files += write_dicom_series(volume, folder, description, patient_id, series_uid=series_uid, tags=extra,
                                    skip_slices=(drop_volume_slices or {}).get(v, ()),
                                    instance_offset=v * size[2])
    return files
