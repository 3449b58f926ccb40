"""All site steps, by query action (``query.<action>``). Each protocol adds its module's ``STEPS`` here."""

from __future__ import annotations

from client.steps import (
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
    segmentation_study,
)
from client.steps.base import SiteStep, work_dir

SITE_STEPS: dict[str, SiteStep] = {
    **preprocessing.STEPS,
    **outcomes.STEPS,
    **prognosis.STEPS,
    **radiogenomics.STEPS,
    **harmonisation.STEPS,
    **reduction.STEPS,
    **fingerprint.STEPS,
    **segmentation.STEPS,
    **features.STEPS,
    **rollcall.STEPS,
    **classifier.STEPS,
    **report.STEPS,
    **inference.STEPS,
    **segmentation_study.STEPS,
}

__all__ = ["SITE_STEPS", "SiteStep", "work_dir"]
