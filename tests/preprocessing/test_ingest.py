"""``fedbiopsy ingest``: DICOM series written with SimpleITK's series writer, back to a valid site directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from cli.main import app
from client.ingest import check_series, ingest_dicom, map_description, parse_mapping
from common.errors import ConfigError, SiteDataError
from common.imageio import array_to_image
from common.sitedata import load_site_config
from common.validation import validate_site
from simulations.dicom import make_uid, write_dicom_series
from simulations.phantoms import simulate_patient

MAPPING = {"T2 TSE AX": "T2w", "*t1*post*": "CET1"}
SCANNER = {"0008|0070": "Siemens", "0008|1090": "Avanto", "0018|0087": "1.5", "0010|0040": "F", "0010|1010": "007Y"}


def _volume(patient: int, seq: str) -> sitk.Image:
    ph = simulate_patient(3, patient, size=20, seed=0)  # 1.25 x 1.25 x 1.4 mm voxels
    return array_to_image(ph.images[seq], ph.spacing, ph.origin)


def _write_patient(root: Path, patient: int, **kwargs: object) -> str:
    pid = f"P{patient:03d}"
    study_uid = make_uid("study", pid)
    write_dicom_series(_volume(patient, "T2w"), root / pid / "s1", "T2 TSE AX", pid, study_uid, tags=SCANNER)
    write_dicom_series(_volume(patient, "CET1"), root / pid / "s2", "T1 VIBE post Gd", pid, study_uid,
                       tags=SCANNER, **kwargs)  # type: ignore[arg-type]
    write_dicom_series(_volume(patient, "T2w")[:, :, :3], root / pid / "s3", "localizer", pid, study_uid, tags=SCANNER)
    return pid


def test_dicom_series_become_a_valid_site_with_the_same_voxels(tmp_path: Path) -> None:
    dicom = tmp_path / "dicom"
    pids = [_write_patient(dicom, p) for p in range(2)]
    report = ingest_dicom(dicom, tmp_path / "site", MAPPING, site_id="hosp-a")
    assert report.ok and sorted(report.written) == pids
    assert len(report.skipped_series) == 2 and all("localizer" in s for s in report.skipped_series)
    assert validate_site(tmp_path / "site").valid
    config = load_site_config(tmp_path / "site")
    assert config.site_id == "hosp-a" and config.sequences == ("T2w", "CET1") and config.reference_sequence == "T2w"
    assert config.scanner.vendor == "Siemens" and config.scanner.field_strength == 1.5
    clinical = pd.read_csv(tmp_path / "site" / "clinical.csv", dtype={"patient_id": str})
    assert list(clinical["patient_id"]) == pids and list(clinical["age"]) == [7.0, 7.0]
    assert list(clinical["sex"]) == ["F", "F"]
    for p, pid in enumerate(pids):
        for seq in ("T2w", "CET1"):
            src = _volume(p, seq)
            got = sitk.ReadImage(str(tmp_path / "site" / "images" / pid / f"{seq}.nii.gz"))
            assert np.allclose(got.GetSpacing(), src.GetSpacing(), atol=1e-4)
            assert np.allclose(got.GetOrigin(), src.GetOrigin(), atol=1e-4)
            expected = sitk.GetArrayFromImage(src).astype(np.int16)  # the writer stores int16
            assert np.array_equal(sitk.GetArrayFromImage(got), expected)


def test_incomplete_series_is_refused_with_the_gap_and_the_patient_left_out(tmp_path: Path) -> None:
    dicom = tmp_path / "dicom"
    _write_patient(dicom, 0)
    _write_patient(dicom, 1, skip_slices=(7,))
    report = ingest_dicom(dicom, tmp_path / "site", MAPPING)
    assert not report.ok and sorted(report.written) == ["P000"]
    text = "\n".join(report.problems)
    assert "incomplete series: missing slice(s) after position" in text and "gap 2.80 mm, spacing 1.40 mm" in text
    assert "patient P001: no series for ['CET1']" in text
    assert validate_site(tmp_path / "site").valid  # what was written is still a valid site


def test_mixed_series_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    uid = make_uid("one-uid")
    write_dicom_series(_volume(0, "T2w"), folder, "T2 TSE AX", "P000", series_uid=uid)
    other = sitk.Resample(_volume(0, "T2w"), [16, 16, 20], sitk.Transform(), sitk.sitkLinear,
                          _volume(0, "T2w").GetOrigin(), (1.5625, 1.5625, 1.4), _volume(0, "T2w").GetDirection())
    for f in write_dicom_series(other, tmp_path / "tmp", "T2 TSE AX", "P000", series_uid=uid):
        f.rename(folder / f"b_{f.name}")  # a second matrix size under the same SeriesInstanceUID
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    with pytest.raises(SiteDataError, match="mixed series: its slices differ in (rows|columns)"):
        check_series(folder, uid, files)
    # a repeated acquisition: the same positions twice
    folder2 = tmp_path / "repeat"
    uid2 = make_uid("uid-2")
    write_dicom_series(_volume(0, "T2w"), folder2, "T2 TSE AX", "P000", series_uid=uid2)
    for f in write_dicom_series(_volume(0, "T2w"), tmp_path / "tmp2", "T2 TSE AX", "P000", series_uid=uid2):
        f.rename(folder2 / f"b_{f.name}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder2), uid2)
    with pytest.raises(SiteDataError, match="two slices share a position"):
        check_series(folder2, uid2, files)


def test_mapping_rules_and_cli(tmp_path: Path) -> None:
    assert map_description("t2 tse ax", MAPPING) == "T2w"  # exact, case-insensitive
    assert map_description("T1 VIBE post Gd", MAPPING) == "CET1"  # pattern
    assert map_description("localizer", MAPPING) is None
    with pytest.raises(ConfigError, match="matches patterns of"):
        map_description("t1 post t2", {"*t1*": "T1", "*t2*": "T2w"})
    assert parse_mapping(["T2 TSE AX=T2w", "*t1*post*=CET1"]) == MAPPING
    with pytest.raises(ConfigError, match="DESCRIPTION=SEQUENCE"):
        parse_mapping(["T2w"])
    dicom = tmp_path / "dicom"
    _write_patient(dicom, 0)
    # two series claiming one sequence
    write_dicom_series(_volume(0, "T2w"), dicom / "P000" / "s4", "T2 TSE AX", "P000", series_uid=make_uid("dup"))
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(dicom), "--out", str(tmp_path / "site"), "--map", "T2 TSE AX=T2w",
                                 "--map", "*t1*post*=CET1"])
    assert result.exit_code == 2, result.output  # nothing could be written
    assert "2 series map to T2w" in result.output.replace("\n", " ")
