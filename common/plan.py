"""The global preprocessing plan: what the server learns from the sites and returns to them.

Built by the preprocessing phase from the fingerprint (target spacing) and the federated Nyúl landmarks,
written as ``plan.json`` (a "plan"-kind artifact) and read by ``fedbiopsy preprocess --plan``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.config import PreprocessingConfig, StudyConfig
from common.errors import ConfigError
from common.hashing import canonical_json, sha256_json, sha256_text

PLAN_FORMAT: Literal["fedbiopsy-plan/1"] = "fedbiopsy-plan/1"
PLAN_FIX = "pass the plan.json the preprocessing phase wrote"


class NyulPlan(BaseModel):
    """The Nyúl standard scale: landmark percentiles, the standard range and the landmarks per sequence."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    percentiles: tuple[float, ...]
    scale: tuple[float, float]
    landmarks: dict[str, tuple[float, ...]]

    @model_validator(mode="after")
    def _shapes(self) -> NyulPlan:
        for seq, lm in self.landmarks.items():
            if len(lm) != len(self.percentiles) or any(b < a for a, b in zip(lm, lm[1:], strict=False)):
                raise ValueError(f"landmarks of {seq} must be {len(self.percentiles)} non-decreasing values")
        return self


class PreprocessingPlan(BaseModel):
    """Everything a site needs to preprocess its cases exactly like every other site."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["fedbiopsy-plan/1"] = PLAN_FORMAT
    study_name: str
    study_hash: str
    sequences: tuple[str, ...]
    reference_sequence: str
    target_spacing: tuple[float, float, float]
    nyul: NyulPlan | None = None
    preprocessing: PreprocessingConfig
    settings_hash: str
    cases_per_site: dict[str, int] = Field(default_factory=dict)
    site_local: bool = False  # True: learnt from one site only (``fedbiopsy preprocess`` without --plan)

    @property
    def sha256(self) -> str:
        """sha256 of the plan's canonical JSON (equal to the hash of the written file)."""
        return sha256_json(self.model_dump(mode="json"))


def settings_hash(config: PreprocessingConfig) -> str:
    """sha256 of the preprocessing settings (what the registry records as ``settings_hash``)."""
    return sha256_json(config.model_dump(mode="json"))


def build_plan(study: StudyConfig, target_spacing: tuple[float, float, float], nyul: dict | None,
               cases_per_site: dict[str, int], site_local: bool = False) -> PreprocessingPlan:
    """A plan from the study, the target spacing and the output of :func:`common.nyul.aggregate_nyul`."""
    nyul_plan = None
    if nyul is not None:
        nyul_plan = NyulPlan(percentiles=tuple(nyul["percentiles"]), scale=tuple(nyul["scale"]),
                             landmarks={k: tuple(v) for k, v in nyul["landmarks"].items()})
    return PreprocessingPlan(
        study_name=study.name, study_hash=study.hash, sequences=study.sequences,
        reference_sequence=study.reference_sequence,
        target_spacing=tuple(float(s) for s in target_spacing),  # type: ignore[arg-type]
        nyul=nyul_plan, preprocessing=study.preprocessing, settings_hash=settings_hash(study.preprocessing),
        cases_per_site=dict(cases_per_site), site_local=site_local,
    )


def write_plan(plan: PreprocessingPlan, path: Path | str) -> str:
    """Write the plan as canonical JSON; returns its sha256 (the file's hash)."""
    text = canonical_json(plan.model_dump(mode="json"))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
    return sha256_text(text)


def parse_plan(text: str, source: Path | str = "plan") -> PreprocessingPlan:
    """A plan from its JSON text; a malformed plan raises :class:`ConfigError` naming the problem."""
    try:
        plan = PreprocessingPlan.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(source, f"not valid JSON ({exc})", PLAN_FIX) from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(source, f"invalid plan ({problems})", PLAN_FIX) from exc
    if plan.settings_hash != settings_hash(plan.preprocessing):
        raise ConfigError(source, "settings_hash does not match the plan's preprocessing settings",
                          "the plan was edited by hand; fetch it again from the server")
    return plan


def load_plan(path: Path | str) -> PreprocessingPlan:
    """Read a plan written by :func:`write_plan`."""
    src = Path(path)
    if not src.is_file():
        raise ConfigError(src, "plan not found", PLAN_FIX)
    return parse_plan(src.read_text(encoding="utf-8"), src)
