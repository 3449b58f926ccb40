"""Noisy survival tables (``policy.noise_epsilon``): Opacus-calibrated Gaussian noise on a fixed grid, charged to
the site's lifetime privacy ledger, refused past its budget; the server's pooled table stays a table of counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.privacy_ledger import read_charges, spent_epsilon
from client.training.dp import noise_multiplier_for
from common.errors import PolicyError
from common.outcomes_site import OUTCOMES_STEPS, SURVIVAL_TABLE, cohort_from_arrays
from common.sitedata import SitePolicy
from common.survival import NoisyRelease, merge_survival_tables, noisy_table_payload

REQUEST = {"mode": "binned", "time_bin_days": 1e-6}  # the bin width: coarsened to the site's grid


def _data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(1, 3000, n).round(2), rng.integers(0, 2, n), rng.integers(0, 2, n)


def test_the_grid_does_not_depend_on_the_data_and_the_noise_has_its_calibrated_sd() -> None:
    sigma = noise_multiplier_for(1.0, 1e-5, 1.0, 1)
    replies = {}
    for site, seed in (("a", 1), ("b", 2)):
        days, events, groups = _data(seed, 4000)
        noisy = NoisyRelease(sigma, lambda: None, np.random.default_rng(seed + 10), 3650.0)
        replies[site] = noisy_table_payload(site, days, events, groups, 7.0, noisy, min_cohort=5)
    a, b = replies["a"], replies["b"]
    assert np.array_equal(a["times"], b["times"]) and a["time_bin_days"] == b["time_bin_days"]
    assert a["time_bin_days"] % 7.0 == 0 and len(a["times"]) == 12
    assert not set(np.asarray(a["times"]).tolist()) & set(_data(1, 4000)[0].tolist())  # no patient's day
    assert a["noise_sd"] == pytest.approx(sigma * np.sqrt(2))
    days, events, groups = _data(1, 4000)
    exact = noisy_table_payload("a", days, events, groups, 7.0, NoisyRelease(1e-12, lambda: None,
                                                                                 np.random.default_rng(0), 3650.0))
    residual = np.concatenate([(np.asarray(a[k]) - np.asarray(exact[k])).ravel() for k in ("removed", "observed")])
    assert residual.std() == pytest.approx(sigma * np.sqrt(2), rel=0.25)  # 48 draws: within 25 %
    pooled = merge_survival_tables(replies)
    assert np.all(pooled.removed >= 0) and np.all(pooled.observed <= pooled.removed)
    assert np.array_equal(pooled.removed, np.round(pooled.removed))


def test_each_noisy_table_is_charged_and_the_budget_refuses(tmp_path: Path) -> None:
    """max_epsilon 3 at delta 1e-5: a few epsilon-1 tables fit (RDP composes better than 1 + 1 + 1), then the site
    refuses before anything leaves."""
    policy = SitePolicy(max_epsilon=3.0, noise_epsilon=1.0)
    from client.privacy_ledger import charge_gaussian

    sigma = noise_multiplier_for(1.0, policy.max_delta, 1.0, 1)
    days, events, groups = _data(3, 40)
    cohort = cohort_from_arrays("site-n", durations=days, events=events, groups=groups, min_cohort=5, min_cell=5,
                                exact=False)
    cohort.time_floor = 7.0
    cohort.noisy = NoisyRelease(sigma, lambda: charge_gaussian(
        "site-n", tmp_path, policy, study_hash="s" * 64, noise_multiplier=sigma, model="survival_table"),
        np.random.default_rng(0), 3650.0)
    released = 0
    with pytest.raises(PolicyError, match="max_epsilon"):
        for _ in range(50):
            OUTCOMES_STEPS[SURVIVAL_TABLE](cohort, REQUEST)
            released += 1
    charges = read_charges(tmp_path, "site-n")
    assert len(charges) == released >= 3 and {c.phase for c in charges} == {"statistics"}
    assert spent_epsilon(tmp_path, policy) <= 3.0


def test_noisy_kmeans_answers_are_calibrated_capped_and_defeat_the_sweep(tmp_path: Path) -> None:
    """Noisy Lloyd answers: sums of rows clipped to norm C and counts, each with N(0, (sigma sqrt(C^2+1))^2);
    charged once per answer; after the study's rounds the last answer again, uncharged; the differencing sweep
    of test_guard recovers no row."""
    from common.kmeans import NoisyKMeans
    from common.outcomes_site import KMEANS_ASSIGN, KMEANS_MOMENTS
    from common.release_ledger import ReleaseLedger
    from tests.security.test_guard import _sweep_attack

    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 3))
    charges: list[int] = []
    sigma = noise_multiplier_for(1.0, 1e-5, 1.0, 1)
    cohort = cohort_from_arrays("s", features=x, min_cohort=5, min_cell=5)
    cohort.ids, cohort.ledger, cohort.study_key = tuple(f"P{i}" for i in range(12)), ReleaseLedger("s", None, 5), "q"
    cohort.noisy_kmeans = NoisyKMeans(sigma, lambda: charges.append(1), np.random.default_rng(0), clip=3.0, rounds=4)
    OUTCOMES_STEPS[KMEANS_MOMENTS](cohort, {})

    def ask(centres: np.ndarray) -> dict:
        return OUTCOMES_STEPS[KMEANS_ASSIGN](cohort, {"mean": np.zeros(3), "scale": np.ones(3), "centres": centres})

    centres = np.array([[-1.0, 0, 0], [1.0, 0, 0]])
    replies = [ask(centres) for _ in range(6)]
    assert replies[0]["noise_sd"] == pytest.approx(sigma * np.sqrt(10.0)) and len(charges) == 4
    assert [r["held"] for r in replies] == [0, 0, 0, 0, 1, 1]
    assert np.array_equal(replies[4]["sums"], replies[3]["sums"]) and replies[4]["changed"] == 0
    assert len({tuple(np.asarray(r["counts"]).round(9)) for r in replies[:4]}) == 4  # fresh noise every answer
    cohort.study_key = "sweep"
    assert _sweep_attack(ask, 12, 3, x) == 0
