"""Fixtures of the red-team suite: two small simulated hospitals with the default privacy policy."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

PATIENTS = 12  # per site: enough for every default-policy step (min_cohort 5, a 50/50 classifier split)
N_FEATURES = 6


def _two_decimals(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """Values with two decimals, never a whole number nor a multiple of 0.1 (so that no bin edge, count or
    rounded statistic equals one by chance: a match in a reply is a leak)."""
    cents = rng.integers(int(low * 100), int(high * 100), n)
    cents += (cents % 10 == 0)
    return cents / 100.0


def build_sites(root: Path, seed: int = 7) -> list[Path]:
    """Two simulated sites of :data:`PATIENTS` patients (16^3 images), the default policy (min_cohort 5, exact
    outcomes off), a radiomics-like ``derived/features.csv``, ages and survival days with two decimals and
    a free-text ``note`` column in clinical.csv."""
    from simulations.phantoms import simulate_sites
    from simulations.synthetic_features import synthetic_feature_sites

    sites = simulate_sites(root, sites=2, patients=PATIENTS, size=16, seed=seed)
    features, _ = synthetic_feature_sites([PATIENTS, PATIENTS], N_FEATURES, seed=seed + 1)
    rng = np.random.default_rng([seed, 2])
    for site_dir, table in zip(sites, features.values(), strict=True):
        clinical = pd.read_csv(site_dir / "clinical.csv", dtype={"patient_id": str})
        clinical["age"] = _two_decimals(rng, 30, 85, len(clinical))
        clinical["os_days"] = _two_decimals(rng, 40, 2500, len(clinical))
        clinical["note"] = [f"biopsy: {'left' if i % 2 else 'right'} frontal" for i in range(len(clinical))]
        clinical.to_csv(site_dir / "clinical.csv", index=False)
        table = table.set_axis(pd.Index(clinical["patient_id"], name="patient_id"), axis=0)
        (site_dir / "derived").mkdir(exist_ok=True)
        table.to_csv(site_dir / "derived" / "features.csv", float_format="%.17g")
    return sites


@pytest.fixture(scope="module")
def redteam_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The two sites, built once per module (copy them before an attack writes into them)."""
    return build_sites(tmp_path_factory.mktemp("redteam-sites"))


@pytest.fixture(scope="module")
def copy_sites(tmp_path_factory: pytest.TempPathFactory, redteam_sites: list[Path]) -> Callable[[str], list[Path]]:
    """A fresh copy of the sites under a new folder (each attack run writes labels and ledgers at the sites)."""

    def copy(name: str) -> list[Path]:
        root = tmp_path_factory.mktemp(name)
        return [Path(shutil.copytree(p, root / p.name)) for p in redteam_sites]

    return copy


def unlabel_last_case(site_dir: Path) -> str:
    """Make the site's last patient a case without a mask (its mask moves to ``truth/``, as the simulator does
    for unlabelled cases); returns its patient id."""
    clinical = pd.read_csv(site_dir / "clinical.csv", dtype={"patient_id": str})
    pid = str(clinical["patient_id"].iloc[-1])
    (site_dir / "truth").mkdir(exist_ok=True)
    shutil.move(site_dir / "masks" / f"{pid}.nii.gz", site_dir / "truth" / f"{pid}_mask.nii.gz")
    return pid
