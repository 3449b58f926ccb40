"""Typed errors that name the file, site or field at fault and the fix."""

from __future__ import annotations

from pathlib import Path


class FedBiopsyError(Exception):
    """Base class of every error fedbiopsy raises on purpose."""


class FileProblemError(FedBiopsyError):
    """Something wrong with one file: the file, the problem and the fix."""

    def __init__(self, path: Path | str, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}. Fix: {fix}")


class ConfigError(FileProblemError):
    """A study or site configuration file is malformed."""


class SiteDataError(FileProblemError):
    """A file of a site's cohort cannot be used as it is."""


class PolicyError(FedBiopsyError):
    """A request breaks the site's policy; the site refuses it."""

    def __init__(self, site_id: str, rule: str, detail: str) -> None:
        self.site_id = site_id
        self.rule = rule
        super().__init__(f"site {site_id!r} refuses: policy rule {rule!r}: {detail}")


class ProtocolError(FedBiopsyError):
    """A site's input or reply to a federated protocol is unusable."""

    def __init__(self, site_id: str, problem: str, fix: str = "") -> None:
        self.site_id = site_id
        self.problem = problem
        msg = f"site {site_id!r}: {problem}"
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)
