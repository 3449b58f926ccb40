"""The radiomics settings YAML: packaged default, plan spacing, hash, and errors that name the key at fault."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import load_study_config
from common.errors import ConfigError
from common.features.settings import DEFAULT_SETTINGS, load_radiomics_settings, settings_hash, settings_path


def test_default_settings_resolve_per_sequence_with_the_plan_spacing() -> None:
    settings = load_radiomics_settings()
    assert settings_path("default") == settings_path(None) == DEFAULT_SETTINGS
    t2 = settings.for_sequence("T2w", (1.1, 1.1, 1.25))
    cet1 = settings.for_sequence("CET1", (1.1, 1.1, 1.25))
    assert t2["resampledPixelSpacing"] == [1.1, 1.1, 1.25]
    assert (t2["binWidth"], cet1["binWidth"]) == (10, 15)  # fixed bin width per sequence
    assert settings.for_sequence("FLAIR")["binWidth"] == 25  # unlisted sequence: the shared value
    assert t2["label"] == 1 and t2["imageType"] == {"Original": {}}
    assert set(t2["featureClass"]) == {"shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm"}
    assert settings.for_sequence("T2w")["resampledPixelSpacing"] is None  # no plan: native grid


def test_hash_changes_with_what_changes_the_values() -> None:
    settings = load_radiomics_settings()
    base = settings_hash(settings.resolve(("T2w", "CET1"), (1.0, 1.0, 1.0)))
    assert base == settings_hash(settings.resolve(("T2w", "CET1"), (1.0, 1.0, 1.0)))
    assert base != settings_hash(settings.resolve(("T2w", "CET1"), (1.0, 1.0, 1.5)))
    assert base != settings_hash(settings.resolve(("T2w",), (1.0, 1.0, 1.0)))
    changed = settings.model_copy(update={"sequences": {"T2w": {"binWidth": 11}, "CET1": {"binWidth": 15}}})
    assert base != settings_hash(changed.resolve(("T2w", "CET1"), (1.0, 1.0, 1.0)))


def _write(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(DEFAULT_SETTINGS.read_text())
    for key, value in changes.items():
        raw[key] = value
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_misspelt_pyradiomics_setting_is_a_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, sequences={"T2w": {"binwidth": 10}})
    with pytest.raises(ConfigError, match=r"sequences\.T2w.*binwidth"):
        load_radiomics_settings(path)


def test_bad_spacing_and_misplaced_label_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resampledPixelSpacing is 'median'"):
        load_radiomics_settings(_write(tmp_path, setting={"resampledPixelSpacing": "median"}))
    with pytest.raises(ConfigError, match="sets 'label'"):
        load_radiomics_settings(_write(tmp_path, sequences={"T2w": {"label": 2}}))
    with pytest.raises(ConfigError, match="not found"):
        load_radiomics_settings("no-such-settings")


def test_study_config_points_to_the_settings() -> None:
    study = load_study_config()
    assert study.features.settings == "default" and study.features.workers == 2
    assert load_radiomics_settings(study.features.settings).version >= 1
