"""Maps of simulated sites against their ground truth; bad 4D input named per case without stopping the cohort."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from cli.main import app
from client.maps import compute_site_maps, ensure_site_maps
from common.config import load_study_config
from common.errors import ConfigError
from common.validation import load_site, validate_site
from simulations.phantoms_mp import TUMOUR_ADC

STUDY_SEQUENCES = ["T2w", "CET1", "DWI", "DCE"]


def _study(**maps):
    return load_study_config(None, sequences=STUDY_SEQUENCES, **({"maps": maps} if maps else {}))


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)


def _case_errors(site_dir: Path, results) -> dict[str, list[float]]:
    """Per case, the median over tumour voxels of (fitted - truth) / truth, per map."""
    errors: dict[str, list[float]] = {"ADC": [], "Ktrans": [], "ve": []}
    for r in results:
        mask = _array(site_dir / "masks" / f"{r.patient_id}.nii.gz") > 0
        for name in errors:
            truth = _array(site_dir / "truth" / r.patient_id / f"{name}.nii.gz")[mask]
            errors[name].append(float(np.median(_array(r.maps[name])[mask] / truth - 1.0)))
    return errors


def test_maps_recover_the_truth_on_every_simulated_scanner(tmp_path: Path, mp_sites: list[Path]) -> None:
    study = _study()
    per_map: dict[str, list[float]] = {"ADC": [], "Ktrans": [], "ve": []}
    for src in mp_sites:
        site_dir = tmp_path / src.name
        shutil.copytree(src, site_dir)
        results = compute_site_maps(load_site(site_dir), study)
        assert all(r.problem is None for r in results)
        for name, errs in _case_errors(site_dir, results).items():
            per_map[name].extend(errs)
    median = {name: float(np.median(np.abs(errs))) for name, errs in per_map.items()}
    assert median["ADC"] <= 0.05, median
    assert median["Ktrans"] <= 0.10, median
    assert median["ve"] <= 0.10, median
    assert len(per_map["ADC"]) == 18


def test_dense_subtype_restricts_diffusion(mp_sites: list[Path], tmp_path: Path) -> None:
    site_dir = tmp_path / "s"
    shutil.copytree(mp_sites[0], site_dir)
    site = load_site(site_dir)
    results = {r.patient_id: r for r in compute_site_maps(site, _study())}
    by_subtype: dict[int, list[float]] = {0: [], 1: []}
    for case in site.cases:
        mask = _array(case.mask) > 0
        by_subtype[int(case.clinical["label"])].append(float(np.median(_array(results[case.patient_id].maps["ADC"])[mask])))
    assert by_subtype[0] and by_subtype[1]
    assert max(by_subtype[0]) < min(by_subtype[1])  # dense (0.75e-3) below the necrotic-rim tumours
    assert np.median(by_subtype[0]) == pytest.approx(TUMOUR_ADC[0][0], rel=0.1)


def test_maps_are_on_the_reference_grid_and_cached(mp_site: Path) -> None:
    study = _study()
    site = load_site(mp_site)
    first = compute_site_maps(site, study)
    summary = json.loads((mp_site / "derived" / "maps" / "maps.json").read_text())
    assert set(summary["cases"]) == {c.patient_id for c in site.cases}
    ref = sitk.ReadImage(str(site.cases[0].images["T2w"]))
    adc = sitk.ReadImage(str(first[0].maps["ADC"]))
    assert adc.GetSize() == ref.GetSize() and np.allclose(adc.GetSpacing(), ref.GetSpacing())
    stamp = first[0].maps["ADC"].stat().st_mtime_ns
    compute_site_maps(site, study)
    assert first[0].maps["ADC"].stat().st_mtime_ns == stamp  # unchanged inputs: not refitted
    compute_site_maps(site, _study(DWI=["ADC"], DCE=["Ktrans", "ve", "TTP", "ER"]))
    assert first[0].maps["ADC"].stat().st_mtime_ns != stamp  # other settings: refitted
    with_maps = ensure_site_maps(site, study)
    assert all({"ADC", "Ktrans", "ve"} <= set(c.images) for c in with_maps.cases)


def _corrupt(site_dir: Path) -> dict[str, str]:
    """Break four cases' 4D input, each in its own way; returns pid -> the words its problem must contain."""
    pids = sorted(p.name for p in (site_dir / "images").iterdir())
    img = site_dir / "images"
    (img / pids[0] / "DWI.bval").write_text("0 500\n")  # the series has more volumes
    sidecar = json.loads((img / pids[1] / "DCE.json").read_text())
    times = sidecar["AcquisitionTimes_s"]
    times[5], times[6] = times[6], times[5]
    (img / pids[1] / "DCE.json").write_text(json.dumps(sidecar))
    (img / pids[2] / "DCE.json").unlink()
    sitk.WriteImage(sitk.ReadImage(str(img / pids[3] / "T2w.nii.gz")), str(img / pids[3] / "DWI.nii.gz"))
    return {pids[0]: "lists 2", pids[1]: "increase", pids[2]: "no sidecar", pids[3]: "not a 4D series"}


def test_bad_4d_input_is_named_per_case_and_the_cohort_goes_on(mp_site: Path) -> None:
    expected = _corrupt(mp_site)
    report = validate_site(mp_site)
    for case in report.cases:
        text = " ".join(str(p) for p in case.problems)
        if case.patient_id in expected:
            assert expected[case.patient_id] in text, (case.patient_id, text)
            assert "Fix:" in text
        else:
            assert case.valid, text
    site = load_site(mp_site)
    assert len(site.cases) == 2
    results = compute_site_maps(site, _study())
    assert [r.problem for r in results] == [None, None]
    out = CliRunner().invoke(app, ["validate", str(mp_site)])
    assert out.exit_code == 1 and "DWI.bval" in out.output and "DCE.json" in out.output


def test_a_case_that_fails_its_fit_is_left_out(mp_site: Path) -> None:
    site = load_site(mp_site)
    bad = site.cases[0]
    t10 = bad.images["DCE"].parent / "T10.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkFloat32), str(t10))  # not the DCE grid
    results = {r.patient_id: r for r in compute_site_maps(site, _study())}
    assert "T10 map is not on the DCE series' grid" in str(results[bad.patient_id].problem)
    assert sum(r.problem is None for r in results.values()) == len(site.cases) - 1
    assert bad.patient_id not in {c.patient_id for c in ensure_site_maps(site, _study()).cases}


def test_maps_cli(mp_site: Path) -> None:
    out = CliRunner().invoke(app, ["maps", str(mp_site)])
    assert out.exit_code == 0, out.output
    assert "6 of 6 case(s) mapped (ADC, Ktrans, ve)" in out.output
    assert (mp_site / "derived" / "maps" / "maps.json").is_file()


def test_maps_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="unknown map"):
        _study(DWI=["FA"])
    with pytest.raises(ConfigError, match="habitats names"):
        _study(DCE=["Ktrans"], habitats=["ADC", "ve"])
    with pytest.raises(ConfigError, match="4D series"):
        load_study_config(None, sequences=STUDY_SEQUENCES, reference_sequence="DWI")
    study = _study()
    assert study.channels == ("T2w", "CET1", "ADC", "Ktrans", "ve")
    assert study.intensity_sequences == ("T2w", "CET1")
    plain = load_study_config(None)
    changed = load_study_config(None, maps={"DWI": ["ADC", "IVIM_D"]})
    assert plain.hash == changed.hash  # a 3D study does not depend on the maps section
    assert _study().hash != _study(DWI=["ADC", "IVIM_D"]).hash


def test_the_site_policy_decides_which_maps_it_fits(mp_sites: list[Path], tmp_path: Path) -> None:
    from client.guard import check_study
    from common.errors import PolicyError

    site_dir = tmp_path / "s"
    shutil.copytree(mp_sites[0], site_dir)  # b = 0, 500, 1000
    site = load_site(site_dir)
    ivim = _study(DWI=["ADC", "IVIM_D"])
    with pytest.raises(PolicyError, match="parametric map 'IVIM_D'"):
        check_study(site, "features", ivim)
    check_study(site, "features", _study())  # the default maps are allowed
    # allowed by the site but impossible with its b-values: that case's problem, not a crash of the cohort
    results = compute_site_maps(site, ivim)
    assert len(results) == 6
    assert all("IVIM needs a b=0 volume and at least 4 distinct b-values" in str(r.problem) for r in results)


def test_an_unexpected_fit_error_is_the_case_problem(mp_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import client.maps as maps

    site = load_site(mp_site)
    calls = {"n": 0}
    real = maps.fit_adc

    def flaky(signal, bvals):
        calls["n"] += 1
        if calls["n"] == 2:
            raise np.linalg.LinAlgError("Singular matrix")
        return real(signal, bvals)

    monkeypatch.setattr(maps, "fit_adc", flaky)
    results = compute_site_maps(site, _study())
    failed = [r for r in results if r.problem]
    assert len(failed) == 1 and "LinAlgError" in str(failed[0].problem) and "Fix:" in str(failed[0].problem)


def test_channel_names_cannot_clash() -> None:
    with pytest.raises(ConfigError, match="carry the name of a fitted map"):
        load_study_config(None, sequences=["T2w", "DWI", "ADC"])
