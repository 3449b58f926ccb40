"""DICOM ingest of multi-b DWI and multi-phase DCE series: 4D NIfTI with DWI.bval / DCE.json from the headers,
and 4D problems named per patient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from client.ingest import ingest_dicom
from client.maps import compute_site_maps
from common.config import load_study_config
from common.imageio import array_to_image
from common.validation import load_site, validate_site
from simulations.dicom import make_uid, write_dicom_4d, write_dicom_series
from simulations.phantoms import scanner_for_site, simulate_patient
from simulations.phantoms_mp import series_image, simulate_multiparametric

MAPPING = {"T2 TSE AX": "T2w", "T1 post": "CET1", "ep2d_diff*": "DWI", "*dyn*": "DCE"}
SCANNER = {"0008|0070": "Siemens", "0008|1090": "Avanto", "0018|0087": "1.5", "0010|0040": "F", "0010|1010": "007Y",
           "0018|0080": "5", "0018|1314": "12"}
DCE_VALUES = {"Relaxivity_per_mM_s": 4.5, "InjectionTime_s": 31.5, "BaselineVolumes": 7, "Hematocrit": 0.45,
              "T10_s": 1.2}


def _write_patient(root: Path, patient: int, dwi_3d: bool = False, drop: dict | None = None) -> tuple[str, object]:
    scanner, bias = scanner_for_site(3, 0)
    ph = simulate_patient(3, patient, size=24, seed=0, scanner=scanner, bias_seed=bias)
    mp = simulate_multiparametric(ph.tissues, ph.mask, int(str(ph.clinical["label"])), ph.spacing,
                                  scanner.field_strength, scanner.noise_sigma, 0, 3, patient)
    pid = f"P{patient:03d}"
    study = make_uid("study", pid)
    for seq, desc in (("T2w", "T2 TSE AX"), ("CET1", "T1 post")):
        write_dicom_series(array_to_image(ph.images[seq], ph.spacing, ph.origin), root / pid / seq, desc, pid, study,
                           tags=SCANNER)
    dwi = series_image(mp.dwi, ph.spacing, ph.origin)
    if dwi_3d:
        write_dicom_series(sitk.Extract(dwi, [*dwi.GetSize()[:3], 0], [0, 0, 0, 0]), root / pid / "dwi",
                           "ep2d_diff_trace", pid, study, tags=SCANNER)
    else:
        write_dicom_4d(dwi, root / pid / "dwi", "ep2d_diff_trace", pid, "b_value", mp.bvals, SCANNER)
    write_dicom_4d(series_image(mp.dce, ph.spacing, ph.origin), root / pid / "dce", "t1_vibe_dyn", pid, "time",
                   mp.sidecar.AcquisitionTimes_s, SCANNER, drop_volume_slices=drop)
    return pid, mp


def test_4d_dicom_series_become_a_site_with_maps(tmp_path: Path) -> None:
    dicom = tmp_path / "dicom"
    written = dict(_write_patient(dicom, p) for p in range(2))
    report = ingest_dicom(dicom, tmp_path / "site", MAPPING, site_id="hosp-4d", dce=DCE_VALUES)
    assert report.ok, report.problems
    site_dir = tmp_path / "site"
    for pid, mp in written.items():
        case = site_dir / "images" / pid
        dwi = sitk.ReadImage(str(case / "DWI.nii.gz"))
        assert dwi.GetDimension() == 4 and dwi.GetSize()[3] == len(mp.bvals)
        assert [float(b) for b in (case / "DWI.bval").read_text().split()] == list(mp.bvals)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(dwi), mp.dwi.astype(np.int16))  # int16 in DICOM
        sidecar = json.loads((case / "DCE.json").read_text())
        np.testing.assert_allclose(sidecar["AcquisitionTimes_s"], mp.sidecar.AcquisitionTimes_s, atol=1e-5)
        assert sidecar["RepetitionTime_s"] == 0.005 and sidecar["FlipAngle_deg"] == 12.0
        assert sitk.ReadImage(str(case / "DCE.nii.gz")).GetSize()[3] == len(mp.sidecar.AcquisitionTimes_s)
    assert validate_site(site_dir).valid
    site = load_site(site_dir)
    study = load_study_config(None, sequences=["T2w", "CET1", "DWI", "DCE"])
    assert all(r.problem is None for r in compute_site_maps(site, study))


def test_4d_problems_are_named_per_patient(tmp_path: Path) -> None:
    dicom = tmp_path / "dicom"
    good, _ = _write_patient(dicom, 0)
    flat, _ = _write_patient(dicom, 1, dwi_3d=True)
    holed, _ = _write_patient(dicom, 2, drop={10: (3,)})  # a slice inside volume 10
    short, _ = _write_patient(dicom, 3, drop={10: (0,)})  # volume 10 lacks its first slice
    report = ingest_dicom(dicom, tmp_path / "site", MAPPING, dce=DCE_VALUES)
    assert sorted(report.written) == [good]
    text = "\n".join(report.problems)
    assert f"patient {flat}" in text and "one 3D volume where DWI needs a 4D series" in text
    assert f"{holed}/dce" in text and "incomplete series: missing slice(s)" in text
    assert f"{short}/dce" in text and "incomplete 4D series: the volume of time point" in text
    assert text.count("Fix:") >= 5
    missing = tmp_path / "site2"
    ingest_dicom(dicom, missing, MAPPING)  # no site values for the DCE sidecar: validation names the keys
    problems = " ".join(str(p) for c in validate_site(missing).cases for p in c.problems)
    assert "Relaxivity_per_mM_s" in problems and "DCE.json" in problems


def test_a_2d_multislice_series_with_per_slice_times_stays_3d(tmp_path: Path) -> None:
    """Slices of an ordinary 3D series carry their own AcquisitionTime: no repeated position, so no 4D series."""
    ph = simulate_patient(3, 0, size=16, seed=0)
    t2 = array_to_image(ph.images["T2w"], ph.spacing, ph.origin)
    uid = make_uid("series", "P900", "T2 TSE AX")
    for k in range(t2.GetSize()[2]):
        write_dicom_series(t2[:, :, k:k + 1], tmp_path / "dicom" / "P900" / "t2", "T2 TSE AX", "P900",
                           series_uid=uid, tags={**SCANNER, "0008|0032": f"1200{k:02d}.500000"}, instance_offset=k)
    write_dicom_series(array_to_image(ph.images["CET1"], ph.spacing, ph.origin), tmp_path / "dicom" / "P900" / "t1",
                       "T1 post", "P900", tags=SCANNER)
    report = ingest_dicom(tmp_path / "dicom", tmp_path / "site", {"T2 TSE AX": "T2w", "T1 post": "CET1"})
    assert report.ok, report.problems
    image = sitk.ReadImage(str(tmp_path / "site" / "images" / "P900" / "T2w.nii.gz"))
    assert image.GetDimension() == 3 and image.GetSize() == t2.GetSize()
