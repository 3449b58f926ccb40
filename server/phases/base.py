"""What every server phase receives: the grid, the study, the connected nodes and earlier phases' outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from common.config import StudyConfig


@dataclass
class PhaseContext:
    """Shared state of one study run on the server.

    ``outputs`` holds each finished phase's result by phase name; ``participants`` the sites (and their
    case counts) that contributed to each phase; ``registry`` the model registry when one is attached.
    """

    grid: Grid
    study: StudyConfig
    node_ids: list[int]
    result_dir: Path
    outputs: dict[str, Any] = field(default_factory=dict)
    participants: dict[str, dict[str, int]] = field(default_factory=dict)
    registry: Any = None
    run_id: int | None = None


Phase = Callable[[PhaseContext], dict]
