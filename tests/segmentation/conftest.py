"""Fixtures of the segmentation tests: two small simulated sites with enough cases to hold some out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from common.config import StudyConfig
from common.protocol import InMemoryQuery, SiteFunction

if TYPE_CHECKING:
    from client.steps.base import SiteStep


def tiny_segmentation(**overrides: object) -> dict:
    """Segmentation settings small enough for a CPU test (32^3 volumes, whole-volume patches)."""
    seg = {"rounds": 2, "steps_per_epoch": 30, "patch_size": [32, 32, 32], "batch_size": 2, "lr": 0.01,
           "lr_schedule": "constant", "holdout_fraction": 0.4, "overlays": 1, "threads": 1,
           "monai_channels": [8, 16, 32, 64]}
    seg.update(overrides)
    return seg


def tiny_study(**seg_overrides: object) -> StudyConfig:
    """A two-site study: fingerprint then segmentation."""
    return StudyConfig(name="seg-test", phases=("fingerprint", "segmentation"), min_sites=2, round_timeout_s=300,
                       fingerprint={"foreground_samples_per_case": 500},
                       segmentation=tiny_segmentation(**seg_overrides))


def write_study(study: StudyConfig, path: Path) -> Path:
    """The study as YAML (what the ServerApp loads)."""
    path.write_text(yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False))
    return path


def set_policy(site_dir: Path, **policy: object) -> None:
    """Change a site's policy in its site.yaml."""
    from common.sitedata import load_site_config, write_site_config

    cfg = load_site_config(site_dir)
    write_site_config(cfg.model_copy(update={"policy": cfg.policy.model_copy(update=policy)}), site_dir)


@pytest.fixture(scope="module")
def seg_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two simulated sites of 8 patients on 32^3 grids, min_cohort 3 (5 training, 3 held-out cases each)."""
    from simulations.phantoms import simulate_sites

    dirs = simulate_sites(tmp_path_factory.mktemp("segsites"), sites=2, patients=8, size=32, seed=3)
    for d in dirs:
        set_policy(d, min_cohort=3)
    return dirs


def site_query(site_dirs: list[Path], study: StudyConfig) -> InMemoryQuery:
    """The segmentation site steps of these sites, in this process (what the ClientApp runs, minus Flower)."""
    from client.steps.inference import STEPS as INFERENCE_STEPS
    from client.steps.segmentation import STEPS
    from common.validation import load_site

    sites = {site.site_id: site for site in map(load_site, site_dirs)}

    def bind(step: SiteStep) -> SiteFunction:
        return lambda site, payload: step.run(site, study, payload)

    return InMemoryQuery(sites, {action: bind(step) for action, step in {**STEPS, **INFERENCE_STEPS}.items()})
