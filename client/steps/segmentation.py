"""Site step of the segmentation phase: before training, a site says how many cases it trains and evaluates on."""

from __future__ import annotations

from client.steps.base import Payload, SiteStep
from common.config import StudyConfig
from common.sitedata import Site


def cohort_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Training and held-out case counts (refuses below ``min_cohort``)."""
    from client.training.task import site_cohort

    return dict(site_cohort(site, study))


STEPS: dict[str, SiteStep] = {
    "segmentation_cohort": SiteStep("segmentation", cohort_step, lambda site: sum(c.mask is not None
                                                                                 for c in site.cases)),
}
