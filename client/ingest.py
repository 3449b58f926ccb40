"""DICOM series to the site layout: one sequence per series, named through a description mapping.

Every folder under the DICOM root is scanned for series (SimpleITK/GDCM series IDs). A series is checked
before it is read: all its slices must share patient, description, matrix size and orientation (else it is
*mixed*), and its slice positions must be evenly spaced with no repeated or missing position and its
instance numbers without gaps (else it is *incomplete*). Its description (0008,103E) is mapped to a sequence
name (exact, case-insensitive match first, then shell-style patterns such as ``"*t2*"``); unmapped series
(localisers, ...) are skipped and listed. A patient is written only when every mapped sequence it has is sound
and no sequence is claimed by two series; each problem names the series and the fix.
Output: ``site.yaml`` (scanner from the headers), ``clinical.csv`` (patient id, age and sex from the headers;
label and survival left empty for the site to fill), ``images/<patient>/<sequence>.nii.gz``.

4D series: slices that repeat a position are volumes of one series when a header tells them apart: the
b-value (DiffusionBValue, 0018,9087: a multi-b DWI series, written with ``DWI.bval``) or the time (TemporalPosition
Identifier, TriggerTime or AcquisitionTime: a multi-phase DCE series, written with ``DCE.json`` holding the
acquisition times in seconds from the first volume, TR and flip angle from the headers, and the site's values for
what headers do not hold). Every volume must have the same slice positions; a 3D volume mapped to DWI or DCE,
or a 4D series mapped to a 3D sequence, is a problem of that patient.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from client.ingest_4d import read_4d, shape_problem, volume_frames, volume_time, write_sidecar
from common.errors import ConfigError, SiteDataError
from common.imageio import write_image
from common.sitedata import CLINICAL_COLUMNS, Scanner, SiteConfig, write_site_config

log = logging.getLogger(__name__)

TAGS = {
    "description": "0008|103e", "patient_id": "0010|0020", "series_uid": "0020|000e", "rows": "0028|0010",
    "columns": "0028|0011", "orientation": "0020|0037", "position": "0020|0032", "instance": "0020|0013",
    "manufacturer": "0008|0070", "model": "0008|1090", "field_strength": "0018|0087", "sex": "0010|0040",
    "age": "0010|1010", "frames": "0028|0008",
    # 4D series: a volume per b-value (DWI) or per time point (DCE); standard tags only (private ones are off)
    "b_value": "0018|9087", "temporal_position": "0020|0100", "acquisition_time": "0008|0032",
    "trigger_time": "0018|1060", "repetition_time": "0018|0080", "flip_angle": "0018|1314",
}


@dataclass(frozen=True)
class Series:
    """One checked DICOM series: its files in slice order and the header values fedbiopsy uses."""

    folder: Path
    uid: str
    description: str
    patient_id: str
    files: tuple[str, ...]
    header: Mapping[str, str]
    volumes: tuple[tuple[str, ...], ...] = ()  # a 4D series: each volume's files in slice order; () for 3D
    frame_kind: str = ""  # "b_value" (DWI) or "time" (DCE) for a 4D series
    frame_values: tuple[float, ...] = ()  # b-values (s/mm2) or acquisition times (s from the first volume)

    @property
    def four_d(self) -> bool:
        return bool(self.volumes)


@dataclass
class IngestReport:
    """What was written and what was not (with reasons)."""

    site_dir: Path
    written: dict[str, dict[str, Path]] = field(default_factory=dict)  # patient -> sequence -> file
    skipped_series: list[str] = field(default_factory=list)  # unmapped descriptions (not errors)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.written)


def _headers(path: str) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise SiteDataError(path, "cannot be read as DICOM", "remove the file or re-export the series") from exc
    return {name: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
            for name, tag in TAGS.items()}


def _floats(text: str, n: int, what: str, path: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        values = np.array([])
    if values.size != n:
        raise SiteDataError(path, f"{what} ({text!r}) is not {n} numbers", "re-export the series with full headers")
    return values


def check_series(folder: Path, uid: str, files: Sequence[str]) -> Series:
    """Read a series' headers and check it is one complete 3D volume, or a complete 4D series (one volume per
    b-value or time point, see the module docstring); raises :class:`SiteDataError` otherwise."""
    where = f"{folder} (series {uid})"
    headers = [_headers(f) for f in files]
    first = headers[0]
    for key, label in (("patient_id", "patient"), ("description", "series description"),
                       ("rows", "rows"), ("columns", "columns"), ("orientation", "orientation")):
        values = sorted({h[key] for h in headers})
        if len(values) > 1:
            raise SiteDataError(where, f"mixed series: its slices differ in {label} ({', '.join(values[:4])})",
                                "export each acquisition as its own series (one SeriesInstanceUID per volume)")
    if len(files) == 1:
        frames = int(first["frames"] or 1)
        if frames < 2:
            raise SiteDataError(where, "incomplete series: a single 2D slice", "export the whole volume")
        return Series(folder, uid, first["description"], first["patient_id"], tuple(files), first)
    orient = _floats(first["orientation"], 6, "ImageOrientationPatient", files[0])
    normal = np.cross(orient[:3], orient[3:])
    depth = np.array([_floats(h["position"], 3, "ImagePositionPatient", f) @ normal
                      for h, f in zip(headers, files, strict=True)])
    repeated = np.unique(np.round(depth, 2)).size < depth.size  # a 2D multi-slice 3D series has per-slice times
    volume_key = volume_frames(headers) if repeated else None
    if volume_key is not None:
        return _four_d_series(folder, uid, files, headers, depth, volume_key[0], volume_key[1])
    return _three_d_series(folder, uid, files, headers, depth)


def _check_depths(where: str, depth: np.ndarray, headers: Sequence[Mapping[str, str]]) -> np.ndarray:
    """The slice order of one volume, after checking its positions are evenly spaced without gaps."""
    order = np.argsort(depth)
    steps = np.diff(depth[order])
    step = float(np.median(steps))
    if np.any(steps < 1e-3 * max(step, 1e-6)):
        raise SiteDataError(where, "mixed series: two slices share a position (repeated acquisition)",
                            "keep one acquisition per series")
    gaps = np.flatnonzero(steps > 1.5 * step)
    if gaps.size:
        at = float(depth[order][gaps[0]])
        raise SiteDataError(where, f"incomplete series: missing slice(s) after position {at:.2f} mm "
                            f"(gap {steps[gaps[0]]:.2f} mm, spacing {step:.2f} mm)",
                            "export the whole series again (all slices)")
    return order


def _three_d_series(folder: Path, uid: str, files: Sequence[str], headers: Sequence[Mapping[str, str]],
                    depth: np.ndarray) -> Series:
    where = f"{folder} (series {uid})"
    order = _check_depths(where, depth, headers)
    numbers = sorted(int(h["instance"]) for h in headers if h["instance"].lstrip("-").isdigit())
    if len(numbers) == len(headers) and numbers[-1] - numbers[0] + 1 != len(numbers):
        missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
        raise SiteDataError(where, f"incomplete series: instance number(s) {missing[:5]} missing",
                            "export the whole series again (all slices)")
    first = headers[0]
    return Series(folder, uid, first["description"], first["patient_id"], tuple(np.asarray(files)[order]), first)


def _four_d_series(folder: Path, uid: str, files: Sequence[str], headers: Sequence[Mapping[str, str]],
                   depth: np.ndarray, key: str, values: list[float]) -> Series:
    """A multi-b DWI or multi-phase DCE series: one complete volume per b-value or time point, all with the same
    slice positions; DCE volumes in acquisition order, their times in seconds from the first."""
    where = f"{folder} (series {uid})"
    what = "b-value" if key == "b_value" else "time point"
    groups: dict[float, list[int]] = {}
    if key == "acquisition_time":  # slices of one volume differ in time too: the k-th time at each position
        by_position: dict[float, list[int]] = {}
        for i, d in enumerate(np.round(depth, 2)):
            by_position.setdefault(float(d), []).append(i)
        for idx in by_position.values():
            for k, i in enumerate(sorted(idx, key=lambda j: values[j])):
                groups.setdefault(float(k), []).append(i)
    else:
        for i, v in enumerate(values):
            groups.setdefault(v, []).append(i)
    keys = sorted(groups)
    volumes, reference = [], None
    for v in keys:
        members = np.asarray(groups[v])
        order = _check_depths(where, depth[members], [headers[i] for i in members])
        positions = np.round(depth[members][order], 3)
        if reference is None:
            reference = positions
        elif positions.shape != reference.shape or not np.allclose(positions, reference, atol=1e-2):
            raise SiteDataError(where, f"incomplete 4D series: the volume of {what} {v:g} has {positions.size} "
                                f"slice(s) where the first has {reference.size}",
                                "export the whole series again (every slice of every volume)")
        volumes.append(tuple(np.asarray(files)[members][order]))
    if key == "b_value":
        frame_values, kind = tuple(float(k) for k in keys), "b_value"
    else:
        stamps = [volume_time(where, [headers[i] for i in groups[v]], key, v) for v in keys]
        ordered = sorted(range(len(keys)), key=lambda j: stamps[j])
        volumes = [volumes[j] for j in ordered]
        frame_values = tuple(float(stamps[j] - stamps[ordered[0]]) for j in ordered)
        kind = "time"
    first = headers[0]
    return Series(folder, uid, first["description"], first["patient_id"], volumes[0], first, tuple(volumes),
                  kind, frame_values)


def scan_dicom(dicom_dir: Path | str) -> tuple[list[Series], list[str]]:
    """Every series under ``dicom_dir``; returns the sound ones and the problems of the others."""
    root = Path(dicom_dir)
    if not root.is_dir():
        raise ConfigError(root, "DICOM folder not found", "pass the folder holding the DICOM files")
    folders = sorted({p.parent for p in root.rglob("*") if p.is_file()})
    series, problems = [], []
    for folder in folders:
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
            try:
                series.append(check_series(folder, uid, files))
            except SiteDataError as err:
                problems.append(str(err))
    return series, problems


def map_description(description: str, mapping: Mapping[str, str]) -> str | None:
    """The sequence a series description maps to: exact (case-insensitive) first, then one matching pattern."""
    key = description.strip().lower()
    for pattern, seq in mapping.items():
        if pattern.strip().lower() == key:
            return seq
    hits = sorted({seq for pattern, seq in mapping.items() if fnmatch.fnmatch(key, pattern.strip().lower())})
    if len(hits) > 1:
        raise ConfigError("series mapping", f"description {description!r} matches patterns of {hits}",
                          "make the patterns specific enough to pick one sequence")
    return hits[0] if hits else None


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()) or "unknown"


def _age_years(text: str) -> float | None:
    m = re.fullmatch(r"(\d{1,3})([DWMY])", text.strip().upper())
    if not m:
        return None
    return round(int(m.group(1)) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[m.group(2)], 2)


def _most_common(values: Sequence[str]) -> str:
    values = [v for v in values if v]
    return Counter(values).most_common(1)[0][0] if values else ""


def ingest_dicom(dicom_dir: Path | str, site_dir: Path | str, mapping: Mapping[str, str], site_id: str | None = None,
                 reference: str | None = None, field_strength: float | None = None,
                 dce: Mapping[str, object] | None = None) -> IngestReport:
    """Convert a DICOM folder into a site directory (see the module docstring); returns what happened.

    ``dce``: the DCE.json values the headers do not hold (``Relaxivity_per_mM_s``, ``T10_s``, ``Hematocrit``,
    ``InjectionTime_s``, ``BaselineVolumes``, ``AIF``); `fedbiopsy validate` names any still missing."""
    if not mapping:
        raise ConfigError("series mapping", "is empty", "map series descriptions to sequences, e.g. 'T2 TSE=T2w'")
    out = Path(site_dir)
    sequences = tuple(dict.fromkeys(mapping.values()))
    reference = reference or sequences[0]
    if reference not in sequences:
        raise ConfigError("reference sequence", f"{reference!r} is not a mapped sequence {list(sequences)}",
                          "name one of the mapping's sequences")
    series, problems = scan_dicom(dicom_dir)
    report = IngestReport(out, problems=list(problems))
    by_patient: dict[str, dict[str, list[Series]]] = {}
    for s in series:
        seq = map_description(s.description, mapping)
        if seq is None:
            report.skipped_series.append(f"{s.folder} ({s.description or 'no description'})")
            continue
        by_patient.setdefault(_safe_id(s.patient_id or s.folder.name), {}).setdefault(seq, []).append(s)
    rows: list[dict[str, object]] = []
    heads: list[Mapping[str, str]] = []
    for pid, seqs in sorted(by_patient.items()):
        dupes = {seq: ss for seq, ss in seqs.items() if len(ss) > 1}
        if dupes:
            for seq, ss in dupes.items():
                report.problems.append(
                    f"patient {pid}: {len(ss)} series map to {seq} ("
                    + "; ".join(f"{x.description!r} in {x.folder}" for x in ss)
                    + "). Fix: map only one of them (give the others another name or remove them)")
            continue
        lacking = [seq for seq in sequences if seq not in seqs]
        if lacking:
            report.problems.append(f"patient {pid}: no series for {lacking}. Fix: export the missing series or "
                                   "correct the description mapping")
            continue
        shape = [shape_problem(pid, seq, s) for seq, (s,) in seqs.items()]
        if any(shape):
            report.problems.extend(p for p in shape if p)
            continue
        report.written[pid] = _write_patient(out, pid, {seq: s for seq, (s,) in seqs.items()}, dce or {})
        heads.extend(s.header for (s,) in seqs.values())
        h = seqs[reference][0].header
        rows.append({"patient_id": pid, "age": _age_years(h["age"]), "sex": h["sex"] or None})
    if not report.written:
        return report
    strength = field_strength or _field_strength([x["field_strength"] for x in heads])
    if strength is None:
        raise SiteDataError(dicom_dir, "no MagneticFieldStrength (0018,0087) in the headers",
                            "pass the scanner's field strength (--field-strength)")
    config = SiteConfig(site_id=site_id or out.name, name=f"ingested from {Path(dicom_dir).name}",
                        scanner=Scanner(vendor=_most_common([x["manufacturer"] for x in heads]) or "unknown",
                                        model=_most_common([x["model"] for x in heads]), field_strength=strength),
                        sequences=sequences, reference_sequence=reference)
    write_site_config(config, out)
    frame = pd.DataFrame(rows).reindex(columns=list(CLINICAL_COLUMNS))
    frame.to_csv(out / "clinical.csv", index=False)
    (out / "masks").mkdir(exist_ok=True)
    log.info("ingested %d patient(s) into %s; fill label/os_days/os_event in clinical.csv", len(report.written), out)
    return report


def _write_patient(out: Path, pid: str, seqs: Mapping[str, Series], dce: Mapping[str, object]) -> dict[str, Path]:
    written = {}
    for seq, s in seqs.items():
        path = out / "images" / pid / f"{seq}.nii.gz"
        if s.four_d:
            write_image(read_4d(s), path)
            write_sidecar(s, seq, path, dce)
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(s.files))
            write_image(reader.Execute(), path)
        written[seq] = path
    return written


def _field_strength(values: Sequence[str]) -> float | None:
    parsed = []
    for v in values:
        try:
            parsed.append(float(v))
        except ValueError:
            continue
    # some scanners write gauss (15000) instead of tesla (1.5)
    parsed = [p / 10000.0 if p > 100 else p for p in parsed if p > 0]
    return float(Counter(parsed).most_common(1)[0][0]) if parsed else None


def parse_mapping(items: Sequence[str]) -> dict[str, str]:
    """``["T2 TSE=T2w", "*t1*post*=CET1"]`` (or a YAML file of description: sequence) as a mapping."""
    mapping: dict[str, str] = {}
    for item in items:
        path = Path(item)
        if "=" not in item and path.suffix in (".yaml", ".yml") and path.is_file():
            import yaml

            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(path, "is not a mapping of description: sequence", "write `description: T2w` lines")
            mapping.update({str(k): str(v) for k, v in loaded.items()})
            continue
        desc, sep, seq = item.rpartition("=")
        if not sep or not desc.strip() or not seq.strip():
            raise ConfigError("--map", f"{item!r} is not DESCRIPTION=SEQUENCE", "write e.g. --map 'T2 TSE AX=T2w'")
        mapping[desc.strip()] = seq.strip()
    return mapping
