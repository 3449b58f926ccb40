"""The Gaussian mechanism a site applies to an aggregate before it leaves (``policy.noise_epsilon``).

The noise multiplier comes from Opacus' accountant for the site's epsilon at its delta (one release, no
subsampling; ``client.training.dp.noise_multiplier_for``) and the release is booked in the site's lifetime
privacy ledger (``charge``) before anything leaves. Each user states its L2 sensitivity: the most one
patient can change the released vector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianNoise:
    """``N(0, (noise_multiplier x sensitivity)^2)`` on every released value; fresh randomness the server cannot know."""

    noise_multiplier: float
    charge: Callable[[], None]
    rng: np.random.Generator

    def sd(self, sensitivity: float) -> float:
        """The noise standard deviation for an L2 sensitivity."""
        return float(self.noise_multiplier * sensitivity)

    def add(self, values: np.ndarray, sensitivity: float) -> np.ndarray:
        """``values`` plus noise (the caller charges once per release with :attr:`charge`)."""
        arr = np.asarray(values, dtype=np.float64)
        return arr + self.rng.normal(0.0, self.sd(sensitivity), arr.shape)
