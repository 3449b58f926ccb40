"""What the noisy release mode costs, next to exact and to the default policy, in one run.

**k-means**: sites with two clusters in 4 features; federated Lloyd (k=2, k-means++ from site means) with
exact answers, with the default policy's release ledger, and noisy (``NoisyKMeans``: rows clipped to norm 3,
Gaussian noise of epsilon per answer, 10 answers a study); printed: the adjusted Rand index of the labels the
sites keep against the exact run's, and the epsilon the study spends per site (Opacus RDP over its answers).

**survival**:
Sites with two groups of different hazard (the demo's clusters: 3 sites x 16 patients; and a larger study);
each site answers its event table exactly (``exact_outcomes``), binned with small cells merged (the
default policy) or with the Gaussian mechanism of ``policy.noise_epsilon`` (``common.survival.NoisyRelease``,
sigma from Opacus' RDP accountant at delta 1e-5). Printed: the largest absolute difference of the pooled
Kaplan-Meier curve from the exact one (on the exact curve's times), and the log-rank p, median and 10-90 %
over repeated noise draws.

    python -m simulations.bench_noisy_release [--sites 3 --patients 16 --draws 50]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd

from client.training.dp import noise_multiplier_for
from common.outcomes import SurvivalOptions, run_survival
from common.outcomes_site import OUTCOMES_STEPS, OutcomesCohort, cohort_from_arrays
from common.protocol import InMemoryQuery
from common.survival import NoisyRelease, kaplan_meier

DELTA = 1e-5
WIDTH = 7.0


def cohorts(sites: int, patients: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per site: days (exponential, median 600 / 1500 days by group, censored uniformly), events, groups."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(sites):
        groups = rng.integers(0, 2, patients)
        days = rng.exponential(np.where(groups == 1, 1500.0, 600.0) / np.log(2))
        censor = rng.uniform(300.0, 3000.0, patients)
        out[f"site-{s + 1:02d}"] = (np.round(np.minimum(days, censor)) + 1.0, (days <= censor).astype(int), groups)
    return out


def curve_error(reference: pd.DataFrame, other: pd.DataFrame) -> float:
    """Largest |S_ref(t) - S_other(t)| over the reference's times (step functions, right-continuous)."""
    times = reference.index.to_numpy()
    pos = np.searchsorted(other.index.to_numpy(), times, side="right") - 1
    theirs = other["survival"].to_numpy()[np.clip(pos, 0, None)]
    return float(np.max(np.abs(reference["survival"].to_numpy() - theirs)))


def run(data: dict, mode: str, epsilon: float | None = None, rng: np.random.Generator | None = None
        ) -> tuple[pd.DataFrame, float]:
    """The pooled KM curve and log-rank p of one federated survival round in ``mode``."""
    sites: dict[str, OutcomesCohort] = {}
    for site, (days, events, groups) in data.items():
        floor = 1 if mode == "exact" else 5
        cohort = cohort_from_arrays(site, durations=days, events=events, groups=groups, min_cohort=5,
                                    min_cell=floor, exact=mode == "exact")
        if mode == "noisy" and epsilon is not None and rng is not None:
            sigma = noise_multiplier_for(epsilon, DELTA, 1.0, 1)
            cohort.noisy = NoisyRelease(sigma, lambda: None, rng, 3650.0)
        sites[site] = cohort
    options = SurvivalOptions(time_bin_days=None if mode == "exact" else WIDTH)
    result = run_survival(InMemoryQuery(sites, OUTCOMES_STEPS), options)
    p = result.logrank.p_value if result.logrank is not None else float("nan")
    return kaplan_meier(result.table), p


def run_or_nan(data: dict, epsilon: float, rng: np.random.Generator) -> tuple[pd.DataFrame | None, float]:
    """:func:`run` in noisy mode; (None, nan) when the noisy table leaves no test (e.g. a group emptied)."""
    try:
        return run(data, "noisy", epsilon, rng)
    except (np.linalg.LinAlgError, ValueError, ZeroDivisionError):
        return None, float("nan")


def kmeans_sites(sites: int, patients: int, seed: int) -> dict[str, np.ndarray]:
    """Per site: patients x 4 features from two well-separated clusters (site-specific mixing)."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(sites):
        group = rng.integers(0, 2, patients)
        out[f"site-{s + 1:02d}"] = rng.normal(size=(patients, 4)) + 2.5 * group[:, None] * np.array([1, 1, 0, 0])
    return out


def kmeans_labels(data: dict[str, np.ndarray], mode: str, epsilon: float | None = None,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """The labels every site keeps after one federated k-means in ``mode`` ("exact", "ledger" or "noisy")."""
    from common.kmeans import NoisyKMeans
    from common.outcomes import KMeansOptions, run_kmeans
    from common.release_ledger import ReleaseLedger

    sites = {}
    for site, x in data.items():
        cohort = cohort_from_arrays(site, features=x, min_cohort=5, min_cell=1 if mode == "exact" else 5)
        cohort.ids, cohort.study_key = tuple(f"{site}-{i}" for i in range(len(x))), "bench"
        if mode != "exact":
            cohort.ledger = ReleaseLedger(site, None, 5)
        if mode == "noisy" and epsilon is not None and rng is not None:
            cohort.noisy_kmeans = NoisyKMeans(noise_multiplier_for(epsilon, DELTA, 1.0, 1), lambda: None, rng)
        sites[site] = cohort
    run_kmeans(InMemoryQuery(sites, OUTCOMES_STEPS), KMeansOptions(k=2, init="kmeans++", seed=0))
    return np.concatenate([np.asarray(sites[s].labels) for s in sorted(sites)])


def kmeans_table(sites: int, patients: int, seed: int, draws: int) -> None:
    """Print the k-means part of the module docstring."""
    from sklearn.metrics import adjusted_rand_score

    from client.training.dp import epsilon_bound

    data = kmeans_sites(sites, patients, seed)
    exact = kmeans_labels(data, "exact")
    ledger = adjusted_rand_score(exact, kmeans_labels(data, "ledger"))
    print(f"\nk-means, {sites} sites x {patients} patients: ARI vs exact, default policy (ledger) {ledger:.3f}")
    for eps in (1.0, 4.0):
        rng = np.random.default_rng(seed + 2)
        scores = [adjusted_rand_score(exact, kmeans_labels(data, "noisy", eps, rng)) for _ in range(draws)]
        spent = epsilon_bound("rdp", [[noise_multiplier_for(eps, DELTA, 1.0, 1), 1.0, 10]], DELTA)
        a10, a50, a90 = np.percentile(scores, [10, 50, 90])
        print(f"  noisy eps={eps:g} per answer (10 answers: {spent:.1f} a study): ARI {a50:.3f} ({a10:.3f}-{a90:.3f})")


def main() -> None:
    """Print the table of the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    for patients in (args.patients, 10 * args.patients):
        kmeans_table(args.sites, patients, args.seed, max(args.draws // 5, 3))
    for sites, patients in ((args.sites, args.patients), (args.sites, 10 * args.patients)):
        data = cohorts(sites, patients, args.seed)
        exact_curve, exact_p = run(data, "exact")
        binned_curve, binned_p = run(data, "binned")
        print(f"\n{sites} sites x {patients} patients: exact log-rank p = {exact_p:.4f}")
        print(f"  binned {WIDTH:g} d, cells >= 5:  KM error {curve_error(exact_curve, binned_curve):.3f}, "
              f"p = {binned_p:.4f}")
        for eps in (1.0, 4.0):
            rng = np.random.default_rng(args.seed + 1)
            errs, ps = [], []
            for _ in range(args.draws):
                curve, p = run_or_nan(data, eps, rng)
                if curve is not None:
                    errs.append(curve_error(exact_curve, curve))
                ps.append(p)
            e10, e50, e90 = np.percentile(errs, [10, 50, 90])
            p10, p50, p90 = np.nanpercentile(ps, [10, 50, 90])
            print(f"  noisy eps={eps:g} per table:     KM error {e50:.3f} ({e10:.3f}-{e90:.3f}), "
                  f"p = {p50:.4f} ({p10:.4f}-{p90:.4f}); error / binned error = "
                  f"{e50 / max(curve_error(exact_curve, binned_curve), 1e-12):.1f}x")


if __name__ == "__main__":
    main()
