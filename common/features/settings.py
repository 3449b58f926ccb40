"""The study's radiomics settings: a versioned YAML, resolved per sequence against the plan, and hashed.

A settings file (see ``settings_files/default.yaml``) holds pyradiomics settings shared by all sequences, per-sequence
overrides (the fixed bin width of each sequence), the label, image types and feature classes. ``plan`` as
``resampledPixelSpacing`` stands for the fingerprint plan's target spacing, known only when the study runs;
:meth:`RadiomicsSettings.resolve` fills it in and :func:`settings_hash` hashes the result, so that the registry
records exactly the settings that produced a feature table.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import ConfigError
from common.hashing import sha256_json

log = logging.getLogger(__name__)

SETTINGS_DIR = Path(__file__).with_name("settings_files")
DEFAULT_SETTINGS = SETTINGS_DIR / "default.yaml"
PLAN = "plan"


class RadiomicsSettings(BaseModel):
    """The contents of a radiomics settings YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["fedbiopsy-radiomics/1"] = "fedbiopsy-radiomics/1"
    version: int = Field(ge=1)
    name: str = ""
    label: int = Field(1, ge=1)
    setting: dict[str, Any] = Field(default_factory=dict)
    sequences: dict[str, dict[str, Any]] = Field(default_factory=dict)
    imageType: dict[str, dict[str, Any] | None] = {"Original": {}}  # noqa: N815 (pyradiomics' name)
    featureClass: dict[str, list[str] | None] = Field(default_factory=dict)  # noqa: N815 (pyradiomics' name)

    def for_sequence(self, sequence: str, spacing: Sequence[float] | None = None) -> dict[str, Any]:
        """The settings :func:`client.features.radiomics.extract` takes for one sequence.

        ``spacing`` (x, y, z in mm) replaces ``plan``; without it a ``plan`` spacing falls back to the native grid.
        """
        merged: dict[str, Any] = {**self.setting, **self.sequences.get(sequence, {})}
        if merged.get("resampledPixelSpacing") == PLAN:
            merged["resampledPixelSpacing"] = [float(s) for s in spacing] if spacing is not None else None
        merged["label"] = self.label
        merged["imageType"] = {k: dict(v or {}) for k, v in self.imageType.items()}
        if self.featureClass:
            merged["featureClass"] = {k: list(v or []) for k, v in self.featureClass.items()}
        return merged

    def uses_plan(self, sequence: str) -> bool:
        """Whether this sequence's resampling spacing is the plan's (``resampledPixelSpacing: plan``)."""
        return {**self.setting, **self.sequences.get(sequence, {})}.get("resampledPixelSpacing") == PLAN

    def resolve(self, sequences: Sequence[str], spacing: Sequence[float] | None = None) -> dict[str, Any]:
        """Everything that determines the feature values, as canonical JSON-able data (what is hashed)."""
        return {
            "format": self.format,
            "version": self.version,
            "label": self.label,
            "sequences": {seq: self.for_sequence(seq, spacing) for seq in sequences},
        }


def settings_hash(resolved: Mapping[str, Any]) -> str:
    """sha256 of the resolved settings (see :meth:`RadiomicsSettings.resolve`)."""
    return sha256_json(dict(resolved))


def settings_path(ref: str | Path | None) -> Path:
    """A settings file: ``None`` or ``"default"`` is the packaged default; a bare name one of ``settings/``."""
    if ref is None:
        return DEFAULT_SETTINGS
    text = str(ref)
    if "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml")):
        return SETTINGS_DIR / f"{text}.yaml"
    return Path(text)


@cache
def _pyradiomics_schema() -> tuple[dict[str, Any], str]:
    """pyradiomics' parameter-file schema (parsed once) and its custom-functions file."""
    from radiomics import getParameterValidationFiles

    schema_file, funcs = getParameterValidationFiles()
    return yaml.safe_load(Path(schema_file).read_text(encoding="utf-8")), funcs


def _validate_with_pyradiomics(path: Path, settings: RadiomicsSettings) -> None:
    """Check every setting name and value against pyradiomics' own parameter schema (catches typos)."""
    import pykwalify.core
    from pykwalify.errors import PyKwalifyException

    schema, funcs = _pyradiomics_schema()
    pk_log = logging.getLogger("pykwalify")
    previous = pk_log.level
    pk_log.setLevel(logging.CRITICAL)  # pykwalify logs each error before raising it; the ConfigError says it once
    try:
        for seq in [None, *settings.sequences]:
            params = settings.for_sequence(seq or "", [1.0, 1.0, 1.0])
            doc = {"imageType": params.pop("imageType"), "featureClass": params.pop("featureClass", {}),
                   "setting": params}
            try:
                pykwalify.core.Core(source_data=doc, schema_data=copy.deepcopy(schema), extensions=[funcs]).validate()
            except PyKwalifyException as exc:
                where = f"sequences.{seq}" if seq else "setting"
                msg = str(getattr(exc, "msg", exc)).strip().replace("\n", " ")
                raise ConfigError(path, f"{where}: not valid pyradiomics settings ({msg})",
                                  "use pyradiomics' setting names and types (see its parameter-file docs)") from exc
    finally:
        pk_log.setLevel(previous)


def load_radiomics_settings(ref: str | Path | None = None) -> RadiomicsSettings:
    """Load and validate a radiomics settings YAML; see :func:`settings_path` and :func:`parse_radiomics_settings`."""
    path = settings_path(ref)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(path, "radiomics settings not found",
                          f"pass an existing YAML or one of {sorted(p.stem for p in SETTINGS_DIR.glob('*.yaml'))}"
                          ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML ({exc})", "correct the YAML syntax") from exc
    return parse_radiomics_settings(raw, path)


def parse_radiomics_settings(raw: Any, source: Path | str = "radiomics settings") -> RadiomicsSettings:
    """Validate settings data (ours, then pyradiomics' own schema); ``source`` names it in errors."""
    path = Path(source)
    if not isinstance(raw, dict):
        raise ConfigError(path, "the top level is not a mapping", "write `key: value` pairs")
    try:
        settings = RadiomicsSettings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(path, f"invalid radiomics settings ({problems})", "correct the named keys") from exc
    for key, value in [("setting", settings.setting), *((f"sequences.{s}", v) for s, v in settings.sequences.items())]:
        spacing = value.get("resampledPixelSpacing")
        if isinstance(spacing, str) and spacing != PLAN:
            raise ConfigError(path, f"{key}.resampledPixelSpacing is {spacing!r}",
                              f"write {PLAN!r}, null or a list [x, y, z] in mm")
        if "label" in value:
            raise ConfigError(path, f"{key} sets 'label'", "set the label once, at the top level")
    _validate_with_pyradiomics(path, settings)
    return settings
