"""The versioned study configuration: one YAML file, validated once into a frozen typed object.

Later phases add their own section models here; every section has defaults so that a minimal
study file stays valid, and unknown keys are rejected so that a typo never passes silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.errors import ConfigError
from common.hashing import sha256_json

STUDY_SCHEMA_VERSION = 1
DEFAULT_STUDY = Path(__file__).with_name("studies") / "default.yaml"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FingerprintConfig(_Frozen):
    """What each site measures for the fingerprint phase."""

    foreground_samples_per_case: int = Field(10_000, ge=100)
    percentiles: tuple[float, ...] = (0.5, 5.0, 25.0, 50.0, 75.0, 95.0, 99.5)
    seed: int = 1234

    @field_validator("percentiles")
    @classmethod
    def _sorted_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 <= p <= 100.0 for p in v) or list(v) != sorted(v):
            raise ValueError("percentiles must be sorted values in [0, 100]")
        return v


class SimulationConfig(_Frozen):
    """The simulated hospitals used by `make demo` and the tests."""

    sites: int = Field(3, ge=1)
    patients: int = Field(12, ge=1)
    size: int = Field(64, ge=16)
    seed: int = 0


class StudyConfig(_Frozen):
    """One federated study: which sequences, phases and settings, under one hash."""

    schema_version: int = STUDY_SCHEMA_VERSION
    name: str = "fedbiopsy-study"
    seed: int = 0
    sequences: tuple[str, ...] = ("T2w", "CET1")
    reference_sequence: str = "T2w"
    phases: tuple[str, ...] = ("fingerprint",)
    min_sites: int = Field(2, ge=1)
    round_timeout_s: float = Field(600.0, gt=0)
    fingerprint: FingerprintConfig = FingerprintConfig()
    simulation: SimulationConfig = SimulationConfig()

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v > STUDY_SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is newer than this fedbiopsy understands ({STUDY_SCHEMA_VERSION}); "
                "upgrade fedbiopsy"
            )
        return v

    def model_post_init(self, __context: Any) -> None:
        if self.reference_sequence not in self.sequences:
            raise ValueError(
                f"reference_sequence {self.reference_sequence!r} is not one of sequences {list(self.sequences)}"
            )

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the whole configuration."""
        return sha256_json(self.model_dump(mode="json"))


def load_study_config(path: Path | str | None = None, **overrides: Any) -> StudyConfig:
    """Load and validate a study YAML (the packaged default when ``path`` is None).

    ``overrides`` replace top-level keys (e.g. ``phases=("fingerprint",)``) before validation.
    """
    src = Path(path) if path else DEFAULT_STUDY
    try:
        raw = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(src, "study config not found", "pass an existing YAML file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(src, f"not valid YAML ({exc})", "correct the YAML syntax") from exc
    if not isinstance(raw, dict):
        raise ConfigError(src, "the top level is not a mapping", "write `key: value` pairs")
    raw.update(overrides)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(src, f"invalid study config ({problems})", "correct the named keys") from exc
