"""The hash of the Flower app a site runs, so that a hospital can approve exactly which code touches its data.

A SuperNode installs each submitted app (FAB) under ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash8>/``
and runs the ClientApp from there. The *app hash* is the sha256 of the sorted ``path<TAB>sha256`` lines of
the app's files (``.info/`` and byte-code excluded), so it is the same whether computed from the FAB a
coordinating centre submits (:func:`fab_app_hash`) or from the folder a site runs it from
(:func:`directory_app_hash`). Sites list approved hashes in ``site.yaml`` ``policy.approved_apps``.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from pathlib import Path

_INSTALLED = re.compile(r"^[^.]+\.[^.]+\.[^.]+(\.[^.]+)*\.[0-9a-f]{8}$")


def _skipped(rel: str) -> bool:
    parts = rel.split("/")
    return parts[0] == ".info" or "__pycache__" in parts or rel.endswith((".pyc", ".pyo"))


def _listing_hash(files: dict[str, str]) -> str:
    """The app hash of ``{relative path: sha256 of its bytes}`` (skipped files left out)."""
    lines = sorted(f"{rel}\t{digest}" for rel, digest in files.items() if not _skipped(rel))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


MAX_FAB_ENTRIES = 20_000
MAX_FAB_UNPACKED = 512 * 1024 * 1024  # bytes read out of one FAB at most (a zip bomb stops here)


def fab_app_hash(fab: bytes, max_entries: int = MAX_FAB_ENTRIES, max_unpacked: int = MAX_FAB_UNPACKED) -> str:
    """The app hash of a FAB (the zip ``flwr build`` / ``flwr run`` produces).

    Entries are hashed as they are read, in chunks; a FAB with more than ``max_entries`` entries or more than
    ``max_unpacked`` bytes once unpacked raises ``ValueError`` (a FAB comes from whoever submitted the run).
    """
    files: dict[str, str] = {}
    total = 0
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        infos = [info for info in zf.infolist() if not info.is_dir()]
        if len(infos) > max_entries:
            raise ValueError(f"the FAB holds {len(infos)} entries (at most {max_entries})")
        for info in infos:
            digest = hashlib.sha256()
            with zf.open(info) as fh:
                while chunk := fh.read(1 << 20):
                    total += len(chunk)
                    if total > max_unpacked:
                        raise ValueError(f"the FAB unpacks to more than {max_unpacked} bytes")
                    digest.update(chunk)
            files[info.filename] = digest.hexdigest()
    return _listing_hash(files)


def fab_files(fab: bytes) -> set[str]:
    """The file names a FAB holds (its directory, without unpacking anything)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        return {info.filename for info in zf.infolist() if not info.is_dir()}


def directory_app_hash(root: Path) -> str:
    """The app hash of an installed app folder."""
    return _listing_hash({p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in root.rglob("*") if p.is_file()})


def installed_app_root(module_file: str | Path) -> Path | None:
    """The installed-FAB folder a module was loaded from (``.../apps/<pub>.<name>.<ver>.<hash8>``), or None.

    None means the code does not run from an installed Flower app (an editable install, the simulation
    engine, a test): there is no submitted app whose hash could be approved.
    """
    for parent in Path(module_file).resolve().parents:
        if parent.parent.name == "apps" and _INSTALLED.match(parent.name) and (parent / "pyproject.toml").is_file():
            return parent
    return None


_VERIFIED: list[str] = []


def set_verified_app(app_hash: str) -> None:
    """Record the app hash the site's SuperExec (:mod:`deploy.site_exec`) verified for the code of this process."""
    _VERIFIED[:] = [app_hash]


def running_app_hash() -> str | None:
    """The app hash of the fedbiopsy app this process runs: the one the site's SuperExec verified, else that of
    the installed FAB folder it runs from (Flower's own ``flwr-clientapp``), else None (simulation, tests)."""
    if _VERIFIED:
        return _VERIFIED[0]
    root = installed_app_root(__file__)
    return directory_app_hash(root) if root is not None else None
