"""The fedbiopsy Flower app as it is submitted: a staged copy of its sources, its FAB and its app hash.

``flwr run <dir>`` packs every matching file under ``<dir>`` into a FAB, walking the whole tree first (a
virtualenv in the repository makes that take seconds). Staging copies only the app's packages and
``pyproject.toml`` into a clean folder, so submission is fast and the FAB holds exactly the app.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from client.apphash import fab_app_hash
from common.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGES: tuple[str, ...] = ("common", "client", "server", "simulations", "deploy", "cli")
APP_FILES: tuple[str, ...] = ("pyproject.toml", "README.md", "LICENSE")
_SUFFIXES = (".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl")


def _wanted(path: Path) -> bool:
    return (path.is_file() and path.suffix in _SUFFIXES and "__pycache__" not in path.parts
            and not path.name.startswith("test_") and not path.name.endswith("_test.py"))


def stage_app(dest: Path, src: Path = REPO_ROOT) -> Path:
    """Copy the app's ``pyproject.toml`` and packages from ``src`` into ``dest`` (replaced); returns ``dest``."""
    if not (src / "pyproject.toml").is_file():
        raise ConfigError(src, "no pyproject.toml: not the fedbiopsy source tree",
                          "pass --app pointing at the folder holding fedbiopsy's pyproject.toml")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in APP_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    for package in APP_PACKAGES:
        for path in sorted((src / package).rglob("*")):
            if _wanted(path):
                target = dest / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return dest


def build_fab(app_dir: Path) -> bytes:
    """The FAB ``flwr run`` submits for ``app_dir`` (byte-identical: same builder)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def app_hash(app_dir: Path) -> str:
    """The app hash sites approve (``site.yaml`` ``policy.approved_apps``) for the app in ``app_dir``."""
    return fab_app_hash(build_fab(app_dir))
