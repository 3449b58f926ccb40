"""All site steps, by query action (``query.<action>``). Each protocol adds its module's ``STEPS`` here."""

from __future__ import annotations

from client.steps import features, fingerprint, rollcall
from client.steps import outcomes
from client.steps import combat, reduction
from client.steps import segmentation
from client.steps import preprocessing
from client.steps import classifier
from client.steps import report
from client.steps import inference
from client.steps.base import Payload, SiteStep, work_dir

SITE_STEPS: dict[str, SiteStep] = {
    **preprocessing.STEPS,
    **outcomes.STEPS,
    **combat.STEPS,
    **reduction.STEPS,
    **fingerprint.STEPS,
    **segmentation.STEPS,
    **features.STEPS,
    **rollcall.STEPS,
    **classifier.STEPS,
    **report.STEPS,
    **inference.STEPS,
}

__all__ = ["SITE_STEPS", "Payload", "SiteStep", "work_dir"]
