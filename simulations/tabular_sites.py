"""Tabular hospitals from a real survival dataset bundled with lifelines, for the prognosis phase.

Each site is ``site.yaml`` (no sequences: a tabular site; its policy lists the columns it lets a study use)
and ``clinical.csv`` with the headers a registry export has (spaces, commas, slashes). The rows of the
dataset are split unevenly across the sites (seeded), and each row is marked ``train`` or ``test``.

``gbsg2``: the German Breast Cancer Study Group 2 trial (686 patients, recurrence-free survival; lifelines'
``load_gbsg2``). ``rossi``: the Rossi recidivism data (432 people, weeks to re-arrest; ``load_rossi``).

    python -m simulations.tabular_sites OUT_DIR [--dataset gbsg2] [--sites 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from common.sitedata import ClinicalColumn, SiteConfig, SitePolicy, write_site_config

log = logging.getLogger(__name__)

# dataset -> (loader name, {dataset column: registry header}, categorical headers, duration, event)
GBSG2_COLUMNS = {
    "horTh": "Hormone therapy", "age": "Age (years)", "menostat": "Menopausal status",
    "tsize": "Tumour size, mm", "tgrade": "Tumour grade", "pnodes": "Positive nodes",
    "progrec": "Progesterone receptor, fmol/l", "estrec": "Oestrogen receptor, fmol/l",
    "time": "RFS (days)", "cens": "Recurrence/death",
}
ROSSI_COLUMNS = {
    "week": "Weeks to arrest", "arrest": "Arrested", "fin": "Financial aid", "age": "Age at release (years)",
    "race": "Race, black", "wexp": "Work experience", "mar": "Married", "paro": "Parole", "prio": "Prior convictions",
}
DATASETS = {
    "gbsg2": ("load_gbsg2", GBSG2_COLUMNS, ("Hormone therapy", "Menopausal status", "Tumour grade"),
              "RFS (days)", "Recurrence/death"),
    "rossi": ("load_rossi", ROSSI_COLUMNS, (), "Weeks to arrest", "Arrested"),
}
SPLIT_COLUMN = "Cohort split"


def dataset_frame(name: str) -> pd.DataFrame:
    """The dataset with registry headers (bundled with lifelines: nothing is downloaded)."""
    import lifelines.datasets as ds

    loader, columns, _, _, _ = DATASETS[name]
    return getattr(ds, loader)().rename(columns=columns)[list(columns.values())]


def site_policy(name: str) -> SitePolicy:
    """A site that lets a study use the dataset's columns, answers Newton rounds and releases exact times."""
    _, columns, categorical, duration, event = DATASETS[name]
    allowed: dict[str, ClinicalColumn] = {}
    for header in columns.values():
        if header == duration:
            allowed[header] = ClinicalColumn(kind="continuous", uses=("survival",))
        elif header == event:
            allowed[header] = ClinicalColumn(kind="categorical", uses=("survival",))
        else:
            allowed[header] = ClinicalColumn(kind="categorical" if header in categorical else "continuous",
                                             uses=("covariate",))
    allowed[SPLIT_COLUMN] = ClinicalColumn(kind="categorical", uses=("split",))
    return SitePolicy(allowed_phases=("prognosis",), exact_outcomes=True, cox_newton=True, columns=allowed)


def write_tabular_sites(out: Path | str, dataset: str = "gbsg2", sites: int = 6, seed: int = 0,
                        test_fraction: float = 0.3) -> list[Path]:
    """Split the dataset over ``sites`` uneven tabular sites under ``out``; returns their folders."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {sorted(DATASETS)}")
    frame = dataset_frame(dataset)
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(sites, 2.0))
    owner = rng.choice(sites, size=len(frame), p=weights)
    frame[SPLIT_COLUMN] = np.where(rng.random(len(frame)) < test_fraction, "test", "train")
    frame.insert(0, "patient_id", [f"{dataset}-{i:04d}" for i in range(len(frame))])
    policy = site_policy(dataset)
    paths = []
    for k in range(sites):
        folder = Path(out) / f"site-{k + 1:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        write_site_config(SiteConfig(site_id=f"site-{k + 1:03d}", name=f"{dataset} registry {k + 1}", sequences=(),
                                     policy=policy), folder)
        frame[owner == k].to_csv(folder / "clinical.csv", index=False)
        paths.append(folder)
        log.info("wrote %s (%d patients)", folder, int((owner == k).sum()))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="gbsg2")
    parser.add_argument("--sites", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write_tabular_sites(args.out, args.dataset, args.sites, args.seed)
    logging.getLogger(__name__).info("%d tabular site(s) under %s", len(paths), args.out)


if __name__ == "__main__":
    main()
