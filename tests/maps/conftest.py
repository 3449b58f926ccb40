"""Simulated hospitals with DWI and DCE series (and their truth maps), made once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

MP_SEQUENCES = ("T2w", "CET1", "DWI", "DCE")


@pytest.fixture(scope="session")
def mp_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three simulated sites (3 T / 1.5 T / 3 T, two b-value schemes) of 6 patients on 40^3 grids. Read-only."""
    from simulations.phantoms import simulate_sites

    return simulate_sites(tmp_path_factory.mktemp("mp-sites"), sites=3, patients=6, size=40, seed=0,
                          sequences=MP_SEQUENCES)


@pytest.fixture
def mp_site(tmp_path: Path, mp_sites: list[Path]) -> Path:
    """A private copy of the second (1.5 T) multiparametric site, for tests that change or write into it."""
    dst = tmp_path / mp_sites[1].name
    shutil.copytree(mp_sites[1], dst)
    return dst
