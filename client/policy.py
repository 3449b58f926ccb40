"""The site's policy, enforced in one place before any computation on the site's data.

A refused request is answered with an error reply naming the rule (see ``client/app.py``) and appended to
the site's own refusal log, ``<site_dir>/derived/policy-refusals.jsonl``, which never leaves the site.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from common.errors import PolicyError
from common.sitedata import SiteConfig

log = logging.getLogger(__name__)
REFUSAL_LOG = Path("derived") / "policy-refusals.jsonl"


def check_request(config: SiteConfig, phase: str, study_hash: str, n_cases: int,
                  app_hash: str | None = None) -> None:
    """Raise :class:`PolicyError` naming the rule when the site must refuse this request.

    ``app_hash`` is the hash of the Flower app running the request (:mod:`client.apphash`), None when it
    does not run from an installed app; it is checked only when the site lists ``approved_apps``.
    """
    policy = config.policy
    if phase not in policy.allowed_phases:
        raise PolicyError(config.site_id, "allowed_phases",
                          f"phase {phase!r} is not allowed (allowed: {', '.join(policy.allowed_phases)})")
    if policy.approved_apps and app_hash not in policy.approved_apps:
        shown = f"app {app_hash[:12]}..." if app_hash else "code that is not an installed Flower app (FAB)"
        raise PolicyError(config.site_id, "approved_apps", f"{shown} is not approved by this site")
    if policy.approved_studies and study_hash not in policy.approved_studies:
        raise PolicyError(config.site_id, "approved_studies",
                          f"study config {study_hash[:12]}... is not approved by this site")
    if n_cases < policy.min_cohort:
        raise PolicyError(config.site_id, "min_cohort",
                          f"{n_cases} usable case(s), policy needs at least {policy.min_cohort}")


def record_refusal(site_dir: Path, err: PolicyError, message_type: str, run_id: int | None = None,
                   study_hash: str | None = None) -> Path:
    """Append one refusal to the site's local log; returns the log's path."""
    path = Path(site_dir) / REFUSAL_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": run_id, "message_type": message_type,
             "rule": err.rule, "study_hash": study_hash, "detail": str(err)}
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    return path
