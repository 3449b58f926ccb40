"""The code version a run used: the package version, and the git commit when the code is a git checkout."""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class CodeVersion:
    """Package version, git commit (None when unknown) and whether tracked files differ from it."""

    package: str
    git_commit: str | None
    git_dirty: bool | None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(_SOURCE), *args], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> CodeVersion:
    """The running fedbiopsy's version (computed once per process)."""
    try:
        package = metadata.version("fedbiopsy")
    except metadata.PackageNotFoundError:
        package = "unknown"
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    else:
        log.debug("registry: no git commit known for %s", _SOURCE)
    return CodeVersion(package, commit, dirty)
