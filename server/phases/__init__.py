"""The server half of each study phase, by phase name, in study order."""

from __future__ import annotations

from server.phases import features, fingerprint, rollcall
from server.phases import outcomes
from server.phases import harmonisation, reduction
from server.phases import segmentation
from server.phases import preprocessing
from server.phases import classifier
from server.phases import report
from server.phases import inference
from server.phases.base import Phase, PhaseContext

PHASES: dict[str, Phase] = {
    "preprocessing": preprocessing.run,
    "outcomes": outcomes.run,
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
