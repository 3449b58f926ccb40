"""Each bad input gets its own error naming the file and the fix; other cases are unaffected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from cli.main import app
from common.errors import ConfigError
from common.sitedata import load_site_config
from common.validation import load_site, validate_site


def _case(report, pid):
    return next(c for c in report.cases if c.patient_id == pid)


def _pids(site: Path) -> list[str]:
    return list(pd.read_csv(site / "clinical.csv", dtype={"patient_id": str}).patient_id)


def test_clean_site_is_valid(small_sites) -> None:
    report = validate_site(small_sites[0])
    assert report.valid and len(report.cases) == 6 and not report.site_problems


def _rewrite(path: Path, fn) -> None:
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(fn(image), str(path))


@pytest.mark.parametrize(
    ("field", "mutate"),
    [
        ("spacing", lambda im: (im.SetSpacing(tuple(s * 1.5 for s in im.GetSpacing())), im)[1]),
        ("origin", lambda im: (im.SetOrigin(tuple(o + 5.0 for o in im.GetOrigin())), im)[1]),
        ("direction", lambda im: (im.SetDirection((-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)), im)[1]),
        ("size", lambda im: im[1:, :, :]),
    ],
)
def test_mask_geometry_mismatch_is_named(writable_sites, field, mutate) -> None:
    site = writable_sites[0]
    pid = _pids(site)[2]
    mask = site / "masks" / f"{pid}.nii.gz"
    _rewrite(mask, mutate)
    report = validate_site(site)
    case = _case(report, pid)
    assert not case.valid
    [problem] = case.problems
    assert problem.path == str(mask) and f"geometry differs from T2w: {field}" in problem.problem
    assert "resample the mask" in problem.fix
    assert report.n_invalid == 1  # the other cases are still checked and valid


def test_each_bad_case_gets_its_own_error(writable_sites) -> None:
    site = writable_sites[1]
    p = _pids(site)
    (site / "images" / p[0] / "CET1.nii.gz").unlink()                                     # missing sequence
    empty = sitk.ReadImage(str(site / "masks" / f"{p[1]}.nii.gz")) * 0                    # empty mask
    sitk.WriteImage(empty, str(site / "masks" / f"{p[1]}.nii.gz"))
    _rewrite(site / "images" / p[2] / "T2w.nii.gz",                                        # NaN voxels
             lambda im: _with_array(im, lambda a: np.where(a > a.mean(), np.nan, a)))
    flat = sitk.Image([16, 16], sitk.sitkFloat32)                                          # non-3D image
    sitk.WriteImage(flat, str(site / "images" / p[3] / "CET1.nii.gz"))
    clinical = pd.read_csv(site / "clinical.csv", dtype={"patient_id": str})
    clinical = clinical[clinical.patient_id != p[4]]                                       # images, no clinical row
    extra = clinical.iloc[[0]].assign(patient_id="ghost-001")                              # clinical row, no images
    pd.concat([clinical, extra]).to_csv(site / "clinical.csv", index=False)

    report = validate_site(site)
    messages = {c.patient_id: " | ".join(f"{x.path}: {x.problem} -> {x.fix}" for x in c.problems) for c in report.cases}
    assert "sequence CET1 is missing" in messages[p[0]] and f"images/{p[0]}/CET1.nii.gz" in messages[p[0]]
    assert "mask is empty" in messages[p[1]] and f"masks/{p[1]}.nii.gz" in messages[p[1]]
    assert "NaN/inf voxel" in messages[p[2]] and f"{p[2]}/T2w.nii.gz" in messages[p[2]]
    assert "not a 3D scalar volume" in messages[p[3]] and f"{p[3]}/CET1.nii.gz" in messages[p[3]]
    assert "has images but no clinical row" in messages[p[4]] and "clinical.csv" in messages[p[4]]
    assert "in clinical.csv but has no images" in messages["ghost-001"]
    assert _case(report, p[5]).valid  # one bad case never stops the others
    assert report.n_invalid == 6 and not report.valid
    site_obj = load_site(site)
    assert [c.patient_id for c in site_obj.cases] == [p[5]]


def _with_array(image: sitk.Image, fn) -> sitk.Image:
    out = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(image)))
    out.CopyInformation(image)
    return out


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("site_id: [unclosed", "not valid YAML"),
        ("site_id: x\n", "needs its scanner"),
        ("site_id: x\nscanner: {vendor: GE, field_strength: -1}\n", "field_strength"),
        ("site_id: x\nscanner: {vendor: GE, field_strength: 3}\ncolour: blue\n", "colour: Extra inputs"),
    ],
)
def test_malformed_site_yaml_is_reported_with_the_key(writable_sites, content, expected) -> None:
    site = writable_sites[2]
    (site / "site.yaml").write_text(content)
    with pytest.raises(ConfigError, match=expected) as err:
        load_site_config(site)
    assert err.value.path == str(site / "site.yaml")
    report = validate_site(site)
    assert not report.valid and expected.split(":")[0] in report.site_problems[0].problem
    assert len(report.cases) == 6  # cases are still checked against the default sequences


def test_cli_exit_status(small_sites, writable_sites) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(small_sites[0])])
    assert ok.exit_code == 0, ok.output
    site = writable_sites[0]
    pid = _pids(site)[0]
    (site / "images" / pid / "T2w.nii.gz").unlink()
    bad = runner.invoke(app, ["validate", str(site)])
    assert bad.exit_code == 1 and pid in bad.output and "1 invalid" in bad.output
