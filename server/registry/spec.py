"""An entry of a phase's ``"artifacts"`` list (the contract between phases and the registry), validated."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.registry.errors import RegistryError

log = logging.getLogger(__name__)
Kind = Literal["plan", "segmentation", "classifier", "harmonisation", "signature", "outcomes", "prognosis"]


class ArtifactSpec(BaseModel):
    """``{"kind", "path", "round", "metrics", "epsilon", "delta", "settings_hash", "preprocessing_hash",
    "parent_kind", "participants"}``; keys outside these are kept in ``extra`` and logged.

    ``participants`` ({site_id: n_cases}) overrides the phase's participants for this artifact alone
    (e.g. a round a site missed); ``delta`` is the DP delta; both are optional extensions of the contract.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    kind: Kind
    path: str = Field(min_length=1)
    round: int | None = None
    metrics: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    epsilon: dict[str, float] = Field(default_factory=dict)
    delta: float | None = Field(None, ge=0)
    settings_hash: str | None = None
    preprocessing_hash: str | None = None
    parent_kind: Kind | None = None
    participants: dict[str, int] | None = None

    @property
    def extra(self) -> dict[str, Any]:
        """Keys the contract does not define, kept verbatim."""
        return dict(self.model_extra or {})

    def clean_metrics(self) -> dict[str, dict[str, float | None]]:
        """The metrics with non-finite values (undefined AUC, ...) as None, which JSON can hold."""
        return {k: {m: (v if v is not None and math.isfinite(v) else None) for m, v in d.items()}
                for k, d in self.metrics.items()}

    def file(self, result_dir: Path) -> Path:
        """The artifact's file; a relative path is relative to the result folder."""
        p = Path(self.path)
        return p if p.is_absolute() else result_dir / p


def parse_artifacts(phase: str, output: Any) -> list[ArtifactSpec]:
    """The validated ``"artifacts"`` of a phase's output (none: an empty list)."""
    raw = output.get("artifacts", []) if isinstance(output, dict) else []
    if not isinstance(raw, list):
        raise RegistryError(f"phase {phase!r}: 'artifacts' is a {type(raw).__name__}, not a list. Fix: return "
                            "a list of {'kind', 'path', ...} entries")
    specs = []
    for i, item in enumerate(raw):
        try:
            spec = ArtifactSpec.model_validate(item)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(entry)'}: {e['msg']}" for e in exc.errors())
            raise RegistryError(f"phase {phase!r}: artifacts[{i}] is invalid ({problems}). Fix: follow the artifact "
                                "contract in server/registry/__init__.py") from exc
        if spec.extra:
            log.warning("phase %s: artifacts[%d] has keys outside the contract %s; kept in the version's 'extra'",
                        phase, i, sorted(spec.extra))
        specs.append(spec)
    return specs
