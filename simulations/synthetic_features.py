"""Synthetic multi-site feature tables with known scanner effects, for harmonisation tests and benchmarks.

Each patient's features are ``mu + age/sex/grade effects + a latent-factor structure + noise``; each scanner
adds its own shift and scale per feature (ComBat's ``gamma`` and ``delta``). Features span six orders of
magnitude, as radiomics features do. Ages are float32-exact, so that neuroCombat's float32 cast of continuous
covariates changes nothing (see docs/COMBAT.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def site_name(index: int) -> str:
    """The id of synthetic site ``index``."""
    return f"site-{index + 1:02d}"


def synthetic_feature_sites(sizes: Sequence[int], n_features: int, seed: int = 0,
                            scanners: Sequence[Sequence[str]] | None = None, n_latent: int = 3,
                            ) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Feature tables (patients x features) and covariates (age, sex, grade, scanner) of ``len(sizes)`` sites.

    ``scanners[i]``: the scanner labels site ``i`` draws its patients' scanners from (default: one scanner
    per site, named after it). Returns ``(features, covariates)`` keyed by site id.
    """
    rng = np.random.default_rng([seed, 0])
    p = n_features
    scale = 10.0 ** rng.uniform(-2.0, 3.0, p)
    mu = rng.normal(0.0, 3.0, p)
    age_effect = rng.normal(0.0, 0.03, p)
    sex_effect = rng.normal(0.0, 0.5, p)
    grade_effect = rng.normal(0.0, 0.4, (3, p))
    loadings = rng.normal(0.0, 1.0, (n_latent, p)) * (rng.random((n_latent, p)) < 0.5)
    all_scanners = sorted({s for group in (scanners or []) for s in group})
    labels = all_scanners or [f"scanner-{site_name(i)}" for i in range(len(sizes))]
    effect_rng = np.random.default_rng([seed, 1])
    shift = {s: effect_rng.normal(0.0, 0.8, p) for s in labels}
    spread = {s: effect_rng.uniform(0.5, 2.0, p) for s in labels}
    features: dict[str, pd.DataFrame] = {}
    covariates: dict[str, pd.DataFrame] = {}
    for i, n in enumerate(sizes):
        site = site_name(i)
        srng = np.random.default_rng([seed, 2, i])
        choices = list(scanners[i]) if scanners else [f"scanner-{site}"]
        scanner = np.array([choices[k % len(choices)] for k in range(n)], dtype=object)
        srng.shuffle(scanner)
        age = srng.uniform(20.0, 80.0, n).astype(np.float32).astype(np.float64)
        sex = srng.choice(np.array(["F", "M"], dtype=object), n)
        grade = srng.integers(1, 4, n)
        latent = srng.normal(size=(n, n_latent)) @ loadings
        clean = (mu + age[:, None] * age_effect + (sex == "M")[:, None] * sex_effect + grade_effect[grade - 1]
                 + latent)
        noise = srng.normal(size=(n, p))
        batch_shift = np.stack([shift[s] for s in scanner])
        batch_spread = np.stack([spread[s] for s in scanner])
        values = (clean + batch_shift + batch_spread * noise) * scale
        index = pd.Index([f"{site}-p{k:03d}" for k in range(n)], name="patient_id")
        features[site] = pd.DataFrame(values, index=index, columns=[f"feature_{j:04d}" for j in range(p)])
        covariates[site] = pd.DataFrame({"age": age, "sex": sex, "grade": grade.astype(str), "scanner": scanner},
                                        index=index)
    return features, covariates
