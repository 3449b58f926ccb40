"""Per-feature count, mean and centred sum of squares of a site, merged exactly across sites.

Site step: :func:`site_moments`; server step: :func:`merge_moments` (Chan et al.'s pairwise update, which
keeps full precision where the naive ``sum(x**2) - n * mean**2`` would cancel). Used to standardise
k-means features, to size k-means' tolerance as scikit-learn does, and to normalise Cox covariates as
lifelines does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.errors import PolicyError, ProtocolError

Payload = dict[str, object]


@dataclass(frozen=True)
class Moments:
    """Pooled count, mean and centred sum of squares per feature."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    def var(self, ddof: int = 0) -> np.ndarray:
        """The pooled variance per feature (``ddof=1``: the unbiased one pandas reports)."""
        if self.n - ddof <= 0:
            raise ProtocolError("(pooled)", f"{self.n} patient(s) cannot give a variance with ddof={ddof}")
        return self.m2 / (self.n - ddof)

    def std(self, ddof: int = 0) -> np.ndarray:
        return np.sqrt(self.var(ddof))


def check_matrix(site_id: str, X: np.ndarray, what: str = "feature matrix") -> np.ndarray:
    """``X`` as a finite 2-D float array, or a :class:`ProtocolError` naming the site."""
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2:
        raise ProtocolError(site_id, f"{what} is {arr.ndim}-D, not patients x features", "pass a 2-D array")
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise ProtocolError(site_id, f"{what} holds {bad} NaN/infinite value(s)",
                            "impute or drop the incomplete patients at the site before the federated step")
    return arr


def require_cohort(site_id: str, n: int, min_cohort: int) -> None:
    """Refuse (:class:`PolicyError`) when a site has fewer than ``min_cohort`` patients."""
    if n < min_cohort:
        raise PolicyError(site_id, "min_cohort", f"{n} patient(s), policy needs at least {min_cohort}")


def site_moments(site_id: str, X: np.ndarray, min_cohort: int) -> Payload:
    """The site step: count, mean and centred sum of squares of each column of ``X``."""
    arr = check_matrix(site_id, X)
    require_cohort(site_id, arr.shape[0], min_cohort)
    mean = arr.mean(axis=0)
    return {"n": int(arr.shape[0]), "mean": mean, "m2": np.square(arr - mean).sum(axis=0)}


def merge_moments(replies: Mapping[str, Mapping[str, object]]) -> Moments:
    """The server step: exact pooled moments from the sites' :func:`site_moments` replies."""
    if not replies:
        raise ProtocolError("(none)", "no site sent moments")
    parsed = [(site, *_parse_moments(site, replies[site])) for site in sorted(replies)]
    first, n_tot, mean_tot, m2_tot = parsed[0]
    for site, n, mean, m2 in parsed[1:]:
        if mean.shape != mean_tot.shape:
            raise ProtocolError(site, f"sent {mean.size} feature(s), site {first!r} {mean_tot.size}",
                                "use the same feature columns at every site")
        total = n_tot + n
        delta = mean - mean_tot
        mean_tot = mean_tot + delta * (n / total)
        m2_tot = m2_tot + m2 + np.square(delta) * (n_tot * n / total)
        n_tot = total
    return Moments(n=n_tot, mean=mean_tot, m2=m2_tot)


def _parse_moments(site: str, reply: Mapping[str, object]) -> tuple[int, np.ndarray, np.ndarray]:
    try:
        n = int(reply["n"])  # type: ignore[call-overload]
        mean = np.atleast_1d(np.asarray(reply["mean"], dtype=np.float64))
        m2 = np.atleast_1d(np.asarray(reply["m2"], dtype=np.float64))
    except KeyError as exc:
        raise ProtocolError(site, f"moments reply lacks {exc}", "run the same fedbiopsy version at every site") from exc
    if n <= 0 or mean.shape != m2.shape or not np.all(np.isfinite(mean)) or not np.all(np.isfinite(m2)) \
            or np.any(m2 < 0):
        raise ProtocolError(site, "moments reply is not a valid count/mean/sum of squares",
                            "run the same fedbiopsy version at every site")
    return n, mean, m2
