"""The pipeline: built from the study config, recorded step by step, hashed, and replayable."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.preprocessing.base import CaseVolumes, steps_from_history
from client.preprocessing.pipeline import (
    Pipeline,
    build_pipeline,
    history_document,
    read_history,
    write_case,
    write_history,
)
from common.config import PreprocessingConfig, load_study_config
from common.errors import ConfigError
from common.hashing import sha256_file
from common.plan import NyulPlan
from tests.preprocessing.phantom_cases import case, phantom


def test_config_builds_the_steps_in_order_with_their_settings() -> None:
    study = load_study_config(None, preprocessing={
        "steps": ["bias", "denoise", "resample", "normalise"], "bias": {"shrink_factor": 2},
        "resample": {"interpolator": "bspline"}, "normalise": {"method": "zscore"}})
    pipeline = build_pipeline(study.preprocessing, target_spacing=(1.0, 1.0, 2.0))
    assert pipeline.names == ["bias", "denoise", "resample", "zscore"]
    assert pipeline.steps[0].shrink_factor == 2  # type: ignore[attr-defined]
    assert pipeline.steps[2].target_spacing == (1.0, 1.0, 2.0)  # type: ignore[attr-defined]
    assert pipeline.steps[2].interpolator == "bspline"  # type: ignore[attr-defined]
    assert build_pipeline(study.preprocessing, (1.0, 1.0, 2.0), include_normalise=False).names[-1] == "resample"


def test_invalid_settings_and_missing_plan_values_are_named() -> None:
    with pytest.raises(ConfigError, match="normalise must be the last"):
        load_study_config(None, preprocessing={"steps": ["normalise", "bias"]})
    with pytest.raises(ConfigError, match="nyul_percentiles"):
        load_study_config(None, preprocessing={"normalise": {"nyul_percentiles": [50, 10, 90]}})
    with pytest.raises(ConfigError, match="target spacing"):
        build_pipeline(PreprocessingConfig(steps=("resample",)))
    with pytest.raises(ConfigError, match="Nyúl standardisation needs the federated landmarks"):
        build_pipeline(PreprocessingConfig(steps=("normalise",)))
    other = NyulPlan(percentiles=(5.0, 50.0, 95.0), scale=(0.0, 100.0), landmarks={"T2w": (0.0, 40.0, 100.0)})
    with pytest.raises(ConfigError, match="percentiles/scale differ"):
        build_pipeline(PreprocessingConfig(steps=("normalise",)), nyul=other)


def test_history_records_every_step_hashes_as_the_file_and_replays(tmp_path: Path) -> None:
    ph, _ = phantom(2, size=32)
    config = PreprocessingConfig(steps=("bias", "register", "resample", "normalise"),
                                 normalise={"method": "percentile"})
    pipeline = build_pipeline(config, target_spacing=(1.5, 1.5, 1.5))
    src = case(ph)
    out = pipeline(src)
    assert [r["step"] for r in out.history] == ["bias", "register", "resample", "percentile"]
    inputs = write_case(src, tmp_path / "in")
    outputs = write_case(out, tmp_path / "out")
    doc = history_document(out, "site-003", inputs, outputs, plan_sha256="p" * 64, settings_hash="s" * 64)
    path = tmp_path / "h.json"
    sha = write_history(doc, path)
    assert sha == sha256_file(path)  # the registry can store the file's hash
    back = read_history(path)
    assert back["outputs"]["T2w"]["sha256"] == sha256_file(outputs["T2w"])
    assert back["inputs"]["mask"]["sha256"] == sha256_file(inputs["mask"])
    assert back["environment"]["SimpleITK"] == metadata.version("SimpleITK")
    assert back["steps"][0]["libraries"]["SimpleITK"] == metadata.version("SimpleITK")
    assert back["steps"][2]["args"] == {"target_spacing": [1.5, 1.5, 1.5], "interpolator": "linear"}
    # replay: the steps rebuilt from the history give the same volumes from the same inputs
    replayed = Pipeline.from_history(back)(CaseVolumes(src.patient_id, src.images, src.mask, "T2w"))
    assert [s.name for s in steps_from_history(back["steps"])] == pipeline.names
    for seq in ("T2w", "CET1"):
        a, b = sitk.GetArrayFromImage(out.images[seq]), sitk.GetArrayFromImage(replayed.images[seq])
        assert np.abs(a - b).max() < 1e-4  # percentile-rescaled to [0, 1]; the registration is seeded
    assert np.array_equal(sitk.GetArrayFromImage(out.mask), sitk.GetArrayFromImage(replayed.mask))


def test_unknown_step_in_a_history_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown step 'sharpen'"):
        steps_from_history([{"step": "sharpen", "args": {}}])
    with pytest.raises(ConfigError, match="unknown argument 'radius'"):
        steps_from_history([{"step": "bias", "args": {"radius": 3}}])


def test_zscore_normalises_the_foreground_of_every_sequence() -> None:
    ph, _ = phantom(1, size=32)
    out = build_pipeline(PreprocessingConfig(steps=("normalise",), normalise={"method": "zscore"}))(case(ph))
    body = ph.tissues > 0
    for seq in ("T2w", "CET1"):
        values = sitk.GetArrayFromImage(out.images[seq])[body]
        assert abs(values.mean()) < 0.05 and abs(values.std() - 1.0) < 0.05
