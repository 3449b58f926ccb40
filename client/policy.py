"""The site's policy, enforced in one place before any computation on the site's data."""

from __future__ import annotations

import logging

from common.errors import PolicyError
from common.sitedata import SiteConfig

log = logging.getLogger(__name__)


def check_request(config: SiteConfig, phase: str, study_hash: str, n_cases: int) -> None:
    """Raise :class:`PolicyError` naming the rule when the site must refuse this request."""
    policy = config.policy
    if phase not in policy.allowed_phases:
        raise PolicyError(config.site_id, "allowed_phases",
                          f"phase {phase!r} is not allowed (allowed: {', '.join(policy.allowed_phases)})")
    if policy.approved_studies and study_hash not in policy.approved_studies:
        raise PolicyError(config.site_id, "approved_studies",
                          f"study config {study_hash[:12]}... is not approved by this site")
    if n_cases < policy.min_cohort:
        raise PolicyError(config.site_id, "min_cohort",
                          f"{n_cases} usable case(s), policy needs at least {policy.min_cohort}")
