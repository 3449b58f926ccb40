"""What a site step is: a query action bound to a study phase and a function over the site's data.

A step takes the loaded site, the validated study config and the server's payload, and returns the
aggregate payload to send back. Steps do not import Flower; the ClientApp adapts messages to them.
Site-side files a step produces (harmonised features, models) go under :func:`work_dir`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.config import StudyConfig
from common.sitedata import Site

Payload = dict[str, object]


@dataclass(frozen=True)
class SiteStep:
    """A query action: the study phase it belongs to (checked against the site policy), and its function."""

    phase: str
    run: Callable[[Site, StudyConfig, Payload], Payload]
    n_cases: Callable[[Site], int] = lambda site: len(site.cases)


def work_dir(site: Site) -> Path:
    """The site's folder for derived data (features, harmonised tables, local models); never leaves the site."""
    path = site.root / "derived"
    path.mkdir(parents=True, exist_ok=True)
    return path
