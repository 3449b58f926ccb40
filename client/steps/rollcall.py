"""Site step of the roll call: answer with the site's case count (an aggregate) and the app it runs.

The roll call checks a deployment end to end (TLS, node authentication, site policy, rejoining) without
touching images; the reply holds no patient-level value, and the policy's ``min_cohort`` applies as for
every other phase.
"""

from __future__ import annotations

from client.apphash import running_app_hash
from client.steps.base import SiteStep
from common.config import StudyConfig
from common.protocol import Payload
from common.rollcall import ROLLCALL
from common.sitedata import Site


def rollcall_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """The site's number of valid cases, the round it answers and the hash of the app it runs ('' if none)."""
    return {"n_cases": len(site.cases), "round": int(payload.get("round", 0)),  # type: ignore[call-overload]
            "app_hash": running_app_hash() or ""}


STEPS: dict[str, SiteStep] = {
    ROLLCALL: SiteStep("rollcall", rollcall_step),
}
