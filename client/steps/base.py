"""What a site step is: a protocol action bound to a study phase and a function over the site's data.

A step takes the loaded site, the validated study config and the server's payload, and returns the
aggregate payload to send back. Steps do not import Flower; :mod:`client.app` adapts messages to them, with
the site's policy checked once, before the step runs. Site-side files a step produces (harmonised features,
models, ledgers) go under :func:`work_dir`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.config import StudyConfig
from common.protocol import Payload
from common.release_ledger import ReleaseLedger
from common.sitedata import Site

LEDGER_FILE = "release-ledger.json"


def _all_cases(site: Site) -> int:
    return len(site.cases)


@dataclass(frozen=True)
class SiteStep:
    """An action: the study phase it belongs to (checked against the site policy), its function, and the
    number of the site's cases it would use (checked against the policy's ``min_cohort``)."""

    phase: str
    run: Callable[[Site, StudyConfig, Payload], Payload]
    n_cases: Callable[[Site], int] = _all_cases


def cases_with_masks(site: Site) -> int:
    """The site's cases with a radiologist's tumour mask (what mask-based steps check ``min_cohort`` against)."""
    return sum(c.mask is not None for c in site.cases)


def release_ledger(site: Site) -> ReleaseLedger | None:
    """The site's release ledger (``derived/release-ledger.json``), None where its policy allows exact outcomes
    (and releases no noisy statistics, whose round counts the ledger keeps)."""
    policy = site.config.policy
    if policy.exact_outcomes and policy.noise_epsilon is None:
        return None
    return ReleaseLedger(site.site_id, work_dir(site) / LEDGER_FILE, policy.cell_floor, policy.max_ledger_refusals,
                         policy.max_ledger_requests, policy.max_ledger_holds)


def work_dir(site: Site) -> Path:
    """The site's folder for derived data (features, harmonised tables, local models); never leaves the site."""
    path = site.root / "derived"
    path.mkdir(parents=True, exist_ok=True)
    return path


__all__ = ["LEDGER_FILE", "SiteStep", "cases_with_masks", "release_ledger", "work_dir"]
