"""Benchmark: federated ComBat (and feature reduction) against the pooled computation.

    python -m simulations.bench_combat [--sites 10] [--patients 100] [--features 1000] [--no-flower]

Prints wall times and ratios for (1) the federated protocol over in-memory sites vs pooled neuroCombat 0.2.12 and
the pooled :class:`common.combat_estimator.ComBat`, with the parity error; (2) the same phases through Flower's
simulation engine over site folders on disk (start-up of the engine reported apart from the phases).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
T = TypeVar("T")


def _timed(fn: Callable[..., T], *args: object, **kwargs: object) -> tuple[T, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _neurocombat(table: pd.DataFrame, labels: np.ndarray) -> np.ndarray:
    from neuroCombat import neuroCombat

    with contextlib.redirect_stdout(io.StringIO()):
        out = neuroCombat(np.ascontiguousarray(table.to_numpy().T), pd.DataFrame({"site": labels}), "site")
    return out["data"].T


def bench_in_memory(features: dict[str, pd.DataFrame]) -> float:
    """Print in-process timings; returns the pooled neuroCombat time."""
    from common.combat_estimator import ComBat
    from common.harmonisation import federated_combat
    from common.reduction import federated_feature_reduction

    table = pd.concat(features.values())
    labels = np.concatenate([[s] * len(t) for s, t in features.items()])
    federated, t_fed = _timed(federated_combat, features)
    pooled, t_nc = _timed(_neurocombat, table, labels)
    estimator, t_est = _timed(ComBat("site").fit_transform, table, pd.DataFrame({"site": labels}, index=table.index))
    got = pd.concat(federated.values()).to_numpy()
    err = float((np.abs(got - pooled) / table.to_numpy().std(axis=0)).max())
    print("in memory (ComBat, parametric EB; the same driver over InMemoryQuery)")
    print(f"  federated (site + server steps, 4 rounds) {t_fed:8.2f} s")
    print(f"  pooled neuroCombat 0.2.12                 {t_nc:8.2f} s   federated/pooled = {t_fed / t_nc:6.2f}")
    print(f"  pooled ComBat estimator (this package)    {t_est:8.2f} s   federated/pooled = {t_fed / t_est:6.2f}")
    print(f"  max |federated - neuroCombat| / feature sd = {err:.2e}")
    _, t_red = _timed(federated_feature_reduction, federated, variance_threshold=0.0, correlation_threshold=0.9,
                      n_factors=5)
    print(f"  federated feature reduction (|r| > 0.9 pruning, FA 5 factors) {t_red:.2f} s")
    del estimator
    return t_nc


def _write_sites(root: Path, features: dict[str, pd.DataFrame]) -> list[Path]:
    from common.sitedata import CLINICAL_COLUMNS, write_site_config
    from simulations.phantoms import site_config_for

    dirs = []
    for i, table in enumerate(features.values()):
        config = site_config_for(i, seed=0)
        site_dir = root / config.site_id
        write_site_config(config, site_dir)
        pd.DataFrame(columns=list(CLINICAL_COLUMNS)).to_csv(site_dir / "clinical.csv", index=False)  # no images
        (site_dir / "derived").mkdir(parents=True)
        table.to_csv(site_dir / "derived" / "features.csv")
        dirs.append(site_dir)
    return dirs


def bench_flower(features: dict[str, pd.DataFrame], t_pooled: float) -> None:
    """Print the phases' timings through Flower's simulation engine."""
    from common.config import load_study_config
    from simulations.engine import run_simulated_study

    with tempfile.TemporaryDirectory(prefix="bench-combat-") as tmp:
        root = Path(tmp)
        site_dirs = _write_sites(root / "sites", features)
        study_path = root / "study.yaml"
        study_path.write_text(
            # harmonisation twice: in the first run the virtual SuperNodes also load the ClientApp (torch, MONAI,
            # ...); the summary keeps the second, warm one
            f"name: bench-combat\nphases: [harmonisation, harmonisation, reduction]\nmin_sites: {len(site_dirs)}\n"
            "round_timeout_s: 600\nreduction: {correlation_threshold: 0.9, n_factors: 5}\n"
        )
        study = load_study_config(study_path)
        summary, total = _timed(run_simulated_study, study, study_path, site_dirs, root / "out",
                                cpus_per_site=max((os.cpu_count() or 1) / len(site_dirs), 0.1))
        harm, red = summary["outputs"]["harmonisation"], summary["outputs"]["reduction"]
        print("Flower simulation engine (ray), one virtual SuperNode per site")
        print(f"  whole run (engine start-up, harmonisation cold + warm, reduction, registry) {total:8.2f} s")
        print(f"  harmonisation phase, warm ({len(harm['rounds'])} query rounds)      {harm['wall_s']:8.2f} s"
              f"   federated/pooled neuroCombat = {harm['wall_s'] / t_pooled:6.2f}")
        print(f"  reduction phase (2 query rounds)                     {red['wall_s']:8.2f} s")
        rounds = {**harm["round_s"], **red["round_s"]}
        print("  per round: " + ", ".join(f"{a} {t:.2f} s" for a, t in rounds.items()))


def main() -> None:
    """Print the in-memory and (unless ``--no-flower``) the Flower timings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower simulation engine run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from simulations.synthetic_features import synthetic_feature_sites

    features, _ = synthetic_feature_sites([args.patients] * args.sites, args.features, seed=args.seed)
    print(f"{args.sites} sites x {args.patients} patients x {args.features} features (site = batch, no covariates), "
          f"{os.cpu_count()} CPU(s)")
    t_pooled = bench_in_memory(features)
    if not args.no_flower:
        bench_flower(features, t_pooled)


if __name__ == "__main__":
    main()
