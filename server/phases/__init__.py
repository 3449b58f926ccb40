"""The server half of each study phase, by phase name, in study order."""

from __future__ import annotations

from server.phases import (
    classifier,
    features,
    fingerprint,
    harmonisation,
    inference,
    outcomes,
    preprocessing,
    prognosis,
    radiogenomics,
    reduction,
    report,
    rollcall,
    segmentation,
)
from server.phases.base import Phase, PhaseContext

PHASES: dict[str, Phase] = {
    "preprocessing": preprocessing.run,
    "outcomes": outcomes.run,
    "prognosis": prognosis.run,
    "radiogenomics": radiogenomics.run,
    "harmonisation": harmonisation.run,
    "reduction": reduction.run,
    "fingerprint": fingerprint.run,
    "segmentation": segmentation.run,
    "features": features.run,
    "rollcall": rollcall.run,
    "classifier": classifier.run,
    "inference": inference.run,
    "report": report.run,
}

__all__ = ["PHASES", "Phase", "PhaseContext"]
