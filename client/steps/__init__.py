"""All site steps, by query action (``query.<action>``). Each protocol adds its module's ``STEPS`` here."""

from __future__ import annotations

from client.steps import fingerprint
from client.steps.base import Payload, SiteStep, work_dir

SITE_STEPS: dict[str, SiteStep] = {
    **fingerprint.STEPS,
}

__all__ = ["SITE_STEPS", "Payload", "SiteStep", "work_dir"]
