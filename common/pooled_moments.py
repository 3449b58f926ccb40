"""Count, mean and centred sums of squares of disjoint groups of patients, merged exactly: the one moment merge.

:func:`merge_pair` is Chan, Golub & LeVeque's pairwise update, which keeps full precision where the naive
``sum(x**2) - n * mean**2`` would cancel. It serves three shapes of the same statistic:

* per feature (:class:`Moments`; site step :func:`site_moments`, server step :func:`merge_moments`): k-means
  standardisation and tolerance, Cox normalisation, classifier scaling;
* per group of patients (:class:`GroupMoments`, one row per ComBat batch, count 0 for an absent batch);
* with the full centred crossproduct matrix instead of the per-feature sums (:func:`merge_crossproducts`):
  the pooled correlations of the feature reduction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from common.errors import PolicyError, ProtocolError
from common.protocol import Payload

Part = tuple[int | np.ndarray, np.ndarray, np.ndarray]
"""``(n, mean, m2)`` of one group of patients: see :func:`merge_pair` for the shapes."""


def merge_pair(a: Part, b: Part) -> Part:
    """The moments of the union of two disjoint groups of patients (Chan et al.), exact and stable.

    ``n`` is a count, or one count per group (the rows of ``mean``; a group with count 0 is absent and comes
    out as zeros). ``m2`` is the centred sum of squares of each feature (the shape of ``mean``) or, when it
    has one axis more than ``mean``, the centred crossproduct matrix (features x features).
    """
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = np.asarray(n_a) + np.asarray(n_b)
    safe = np.where(n > 0, n, 1).astype(np.float64)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe)[..., None]
    spread = delta[..., :, None] * delta[..., None, :] if m2_a.ndim > mean_a.ndim else np.square(delta)
    m2 = m2_a + m2_b + spread * (n_a * n_b / safe)[..., None]
    if n.ndim == 0:
        return int(n), mean, m2
    present = (n > 0)[:, None]
    return n, np.where(present, mean, 0.0), np.where(present, m2, 0.0)


def pool(parts: Iterable[Part]) -> Part:
    """The moments of the union of disjoint groups, merged pairwise in the given order."""
    items = iter(parts)
    try:
        out = next(items)
    except StopIteration:
        raise ProtocolError("(none)", "no moments to merge") from None
    for part in items:
        out = merge_pair(out, part)
    return out


# --------------------------------------------------------------------------------------------- per feature


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
        """The pooled standard deviation per feature."""
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
    """The server step: exact pooled moments from the sites' :func:`site_moments` replies (sites in sorted order)."""
    if not replies:
        raise ProtocolError("(none)", "no site sent moments")
    sites = sorted(replies)
    parts = [_parse_moments(site, replies[site]) for site in sites]
    for site, part in zip(sites[1:], parts[1:], strict=True):
        if part[1].shape != parts[0][1].shape:
            raise ProtocolError(site, f"sent {part[1].size} feature(s), site {sites[0]!r} {parts[0][1].size}",
                                "use the same feature columns at every site")
    n, mean, m2 = pool(parts)
    return Moments(n=int(n), mean=mean, m2=m2)


def _parse_moments(site: str, reply: Mapping[str, object]) -> Part:
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


# --------------------------------------------------------------------------------------------- per group


@dataclass(frozen=True)
class GroupMoments:
    """Count, mean and centred sum of squares of each feature per group of patients: rows = groups (0 = absent)."""

    n: np.ndarray  # (G,)
    mean: np.ndarray  # (G, p)
    m2: np.ndarray  # (G, p)

    @classmethod
    def of(cls, values: np.ndarray, index: np.ndarray, n_groups: int) -> GroupMoments:
        """The moments of ``values`` (n x p) grouped by ``index`` (n,) into ``n_groups`` rows."""
        p = values.shape[1]
        n = np.bincount(index, minlength=n_groups).astype(np.int64)
        mean = np.zeros((n_groups, p))
        m2 = np.zeros((n_groups, p))
        for g in np.flatnonzero(n):
            rows = values[index == g]
            mean[g] = rows.mean(axis=0)
            m2[g] = np.square(rows - mean[g]).sum(axis=0)
        return cls(n, mean, m2)

    def merge(self, other: GroupMoments) -> GroupMoments:
        """The moments of both (disjoint) sets of patients, group by group."""
        n, mean, m2 = merge_pair((self.n, self.mean, self.m2), (other.n, other.mean, other.m2))
        return GroupMoments(np.asarray(n), mean, m2)


def merge_group_moments(parts: Iterable[GroupMoments]) -> GroupMoments:
    """The per-group moments of the union of disjoint sets of patients (e.g. the sites' shares of each batch)."""
    n, mean, m2 = pool((p.n, p.mean, p.m2) for p in parts)
    return GroupMoments(np.asarray(n), mean, m2)


# --------------------------------------------------------------------------------------------- crossproducts


def merge_crossproducts(parts: Iterable[tuple[int, np.ndarray, np.ndarray]]) -> tuple[int, np.ndarray, np.ndarray]:
    """Pooled count, feature means and centred crossproduct matrix from each group's ``(n, mean, cross)``."""
    n, mean, cross = pool(parts)
    return int(n), mean, cross
