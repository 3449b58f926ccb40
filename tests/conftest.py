"""Shared fixtures: small simulated hospitals made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# One thread count on every machine (set before numpy/torch load their kernels): a reduction split over a
# machine-dependent number of threads sums in a machine-dependent order.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "2"


@pytest.fixture(scope="session")
def small_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three simulated sites of 6 patients on 32^3 grids (seed 0). Treat as read-only."""
    from simulations.phantoms import simulate_sites

    return simulate_sites(tmp_path_factory.mktemp("sites"), sites=3, patients=6, size=32, seed=0)


@pytest.fixture
def writable_sites(tmp_path: Path, small_sites: list[Path]) -> list[Path]:
    """A private copy of :func:`small_sites` that a test may modify."""
    import shutil

    out = []
    for site in small_sites:
        dst = tmp_path / site.name
        shutil.copytree(site, dst)
        out.append(dst)
    return out
