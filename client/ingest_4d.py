"""The 4D half of DICOM ingest: telling a series' volumes apart (b-value or time), and writing a 4D series with
its ``DWI.bval`` or ``DCE.json`` (see :mod:`client.ingest`)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from common.errors import SiteDataError
from common.maps.layout import DCE, DWI, bval_path, sidecar_path

if TYPE_CHECKING:
    from client.ingest import Series

log = logging.getLogger(__name__)


def dicom_seconds(text: str) -> float | None:
    """HHMMSS(.ffffff) as seconds of the day."""
    m = re.fullmatch(r"(\d{2})(\d{2})(\d{2}(?:\.\d+)?)", text.strip())
    return None if not m else int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def volume_frames(headers: Sequence[Mapping[str, str]]) -> tuple[str, list[float]] | None:
    """What tells a 4D series' volumes apart: the b-value (DWI) or the acquisition time (DCE); None for 3D."""
    def values(key: str) -> list[float] | None:
        out: list[float] = []
        for h in headers:
            if key == "acquisition_time":
                v = dicom_seconds(h[key])
            else:
                try:
                    v = float(h[key])
                except ValueError:
                    v = None
            if v is None:
                return None
            out.append(v)
        return out

    b = values("b_value")
    if b is not None and len(set(b)) > 1:
        return "b_value", b
    for key in ("temporal_position", "trigger_time", "acquisition_time"):
        t = values(key)
        if t is not None and len(set(t)) > 1:
            return key, t
    return None


def volume_time(where: str, headers: Sequence[Mapping[str, str]], key: str, value: float) -> float:
    """When a DCE volume was acquired (s): its earliest AcquisitionTime, else its TriggerTime (ms)."""
    times = [dicom_seconds(h["acquisition_time"]) for h in headers]
    if all(t is not None for t in times):
        return float(min(t for t in times if t is not None))
    if key == "trigger_time":
        return value / 1000.0
    raise SiteDataError(where, "a multi-phase series without AcquisitionTime (0008,0032) or TriggerTime "
                        "(0018,1060): the volumes' times are unknown",
                        "re-export with timing headers, or write the 4D NIfTI and DCE.json by hand")


def shape_problem(pid: str, seq: str, s: Series) -> str | None:
    """A 4D sequence needs a multi-b (DWI) or multi-phase (DCE) series; a 3D sequence a single volume."""
    need = {DWI: "b_value", DCE: "time"}.get(seq)
    if need is None and s.four_d:
        return (f"patient {pid}: {s.description!r} in {s.folder} is a {len(s.volumes)}-volume series but {seq} is "
                "a 3D sequence. Fix: map it to DWI or DCE, or export one volume")
    if need is not None and not s.four_d:
        return (f"patient {pid}: {s.description!r} in {s.folder} is one 3D volume where {seq} needs a 4D series. "
                f"Fix: export the whole {'multi-b' if seq == DWI else 'multi-phase'} series (with its "
                f"{'DiffusionBValue (0018,9087)' if seq == DWI else 'AcquisitionTime (0008,0032)'} headers)")
    if need is not None and s.frame_kind != need:
        return (f"patient {pid}: {s.description!r} in {s.folder} varies in "
                f"{'b-value' if s.frame_kind == 'b_value' else 'time'}, not what {seq} needs. Fix: check the mapping")
    return None


def read_4d(s: Series) -> sitk.Image:
    volumes = []
    for files in s.volumes:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(files))
        volumes.append(sitk.Cast(reader.Execute(), sitk.sitkFloat32))
    image = sitk.JoinSeries(volumes)
    dt = float(np.mean(np.diff(s.frame_values))) if s.frame_kind == "time" and len(s.frame_values) > 1 else 1.0
    image.SetSpacing((*volumes[0].GetSpacing(), dt))
    return image


def write_sidecar(s: Series, seq: str, path: Path, dce: Mapping[str, object]) -> None:
    """``DWI.bval`` from the b-values, or ``DCE.json`` from the timing headers plus the site's ``dce`` values
    (relaxivity, native T1, haematocrit, injection time, baseline volumes: not in the headers)."""
    if seq == DWI:
        bval_path(path).write_text(" ".join(f"{b:g}" for b in s.frame_values) + "\n", encoding="utf-8")
        return
    sidecar: dict[str, object] = {"AcquisitionTimes_s": list(s.frame_values)}
    try:
        sidecar["RepetitionTime_s"] = float(s.header["repetition_time"]) / 1000.0
        sidecar["FlipAngle_deg"] = float(s.header["flip_angle"])
    except ValueError:
        log.warning("%s: no RepetitionTime/FlipAngle in the headers; add them to %s", s.folder, sidecar_path(path))
    sidecar.update(dce)
    sidecar_path(path).write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
