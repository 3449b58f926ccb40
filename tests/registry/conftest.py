"""Fixtures of the registry tests: an empty registry, and one holding the scripted history."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.registry import Registry, open_registry
from tests.registry.history import build_history


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """An empty registry in ``tmp_path/registry``."""
    with open_registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def history(tmp_path: Path, registry: Registry) -> Registry:
    """The registry holding :func:`tests.registry.history.build_history`'s two runs (v1..v7)."""
    build_history(registry, tmp_path / "results")
    return registry
