"""Simulated sites with a tumour signature written at each site, and a policy editor (in-memory runs of the
outcomes drivers are in :mod:`tests.outcomes.memory`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.sitedata import load_site_config, write_site_config


def set_policy(site_dir: Path, **changes: object) -> None:
    """Change a site's policy in its site.yaml."""
    config = load_site_config(site_dir)
    write_site_config(config.model_copy(update={"policy": config.policy.model_copy(update=changes)}), site_dir)


@pytest.fixture(scope="session")
def _signature_sites_base(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from simulations.phantoms import simulate_sites
    from simulations.tumour_signature import write_signature_scores

    sites = simulate_sites(tmp_path_factory.mktemp("outcome-sites"), sites=3, patients=[12, 16, 14], size=24, seed=1)
    write_signature_scores(sites)
    return sites


@pytest.fixture
def signature_sites(tmp_path: Path, _signature_sites_base: list[Path]) -> list[Path]:
    """A private copy of three simulated sites (12, 16, 14 patients, 24^3, seed 1) with derived/signature_scores.csv."""
    out = []
    for site in _signature_sites_base:
        shutil.copytree(site, tmp_path / site.name)
        out.append(tmp_path / site.name)
    return out
