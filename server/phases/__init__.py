"""The server half of each study phase, by phase name, in study order."""

from __future__ import annotations

from server.phases import fingerprint
from server.phases.base import Phase, PhaseContext

PHASES: dict[str, Phase] = {
    "fingerprint": fingerprint.run,
}

__all__ = ["PHASES", "Phase", "PhaseContext"]
