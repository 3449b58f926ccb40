"""simulations.realdata: the cached pyradiomics archive is reused, and an unavailable one is reported with why."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations import realdata


def _no_download(dest: Path, timeout_s: float) -> Path:
    raise RuntimeError("offline: no route to PyPI")


def test_a_complete_cache_is_reused_without_downloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(realdata, "_download", _no_download)
    data = tmp_path / "cache" / "data"
    for path in realdata._wanted(data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert realdata.pyradiomics_data(tmp_path / "cache") == (data, "")


def test_an_unavailable_archive_is_none_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(realdata, "_download", _no_download)
    data_dir, reason = realdata.pyradiomics_data(tmp_path / "cache")
    assert data_dir is None and "offline: no route to PyPI" in reason and "3.0.1" in reason


def test_only_brain1_and_the_baselines_are_kept() -> None:
    assert realdata._keep("pyradiomics-3.0.1/data/brain1_image.nrrd") == "brain1_image.nrrd"
    assert realdata._keep("pyradiomics-3.0.1/data/baseline/baseline_glcm.csv") == "baseline/baseline_glcm.csv"
    assert realdata._keep("pyradiomics-3.0.1/data/lung1_image.nrrd") is None
    assert realdata._keep("pyradiomics-3.0.1/data/../../etc/brain1_x.nrrd") is None
    assert realdata._keep("pyradiomics-3.0.1/radiomics/glcm.py") is None
