"""What every server phase receives: the federation, the study, the result folder and earlier phases' outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import StudyConfig
from server.federation import Federation, FlowerQuery


@dataclass
class PhaseContext:
    """Shared state of one study run on the server.

    ``outputs`` holds each finished phase's result by phase name; ``participants`` the sites (and their
    case counts) that contributed to each phase; ``registry`` the model registry when one is attached.
    A phase reaches the sites only through :meth:`query`.
    """

    federation: Federation
    study: StudyConfig
    result_dir: Path
    outputs: dict[str, Any] = field(default_factory=dict)
    participants: dict[str, dict[str, int]] = field(default_factory=dict)
    registry: Any = None
    run_id: int | None = None

    @property
    def node_ids(self) -> list[int]:
        """The nodes connected when the run started."""
        return self.federation.node_ids

    def query(self, nodes: list[int] | None = None, *, fixed: bool = True, minimum: int | None = None
              ) -> FlowerQuery:
        """A protocol query over ``nodes`` (default: the run's nodes); see :class:`server.federation.FlowerQuery`."""
        return self.federation.query(nodes, fixed=fixed, minimum=minimum)


Phase = Callable[[PhaseContext], dict]


def imaging_grid(ctx: PhaseContext) -> dict[str, Any]:
    """What the study's imaging phases read at the sites (:func:`common.preprocessing.imaging_inputs`) and on
    which grid: ``grid_spacing`` is the preprocessing plan's ``target_spacing`` (x, y, z mm), None on raw inputs
    (each site's native grid)."""
    from common.errors import ConfigError
    from common.preprocessing import PREPROCESSED, imaging_inputs

    kind = imaging_inputs(ctx.study)
    if kind != PREPROCESSED:
        return {"inputs": kind, "grid_spacing": None}
    plan = (ctx.outputs.get("preprocessing") or {}).get("plan")
    if not plan:
        raise ConfigError("study config", "the imaging phases read preprocessed images but the preprocessing "
                          "phase has not run", "list 'preprocessing' before the imaging phases in phases")
    return {"inputs": kind, "grid_spacing": [float(s) for s in plan["target_spacing"]]}
