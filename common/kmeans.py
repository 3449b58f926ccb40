"""Federated k-means: Lloyd iterations on per-site cluster sums and counts; labels stay at the sites.

One Lloyd iteration is one round: the server sends the current centres (and the previous ones), each
site assigns its patients to the nearest centre and answers, per cluster, the sum of its patients'
feature vectors and their count, plus how many of its labels changed since the previous centres
(:func:`site_cluster_sums`); the server divides the pooled sums by the pooled counts
(:func:`lloyd_update`). The loop, its tolerance (scikit-learn's ``mean(var(X)) * tol``, from pooled
moments) and its stopping rules (strict convergence when no label changed, else the centre shift) are
those of ``sklearn.cluster.KMeans(algorithm="lloyd")``, so from the same initial centres the centres
agree to rounding and the labels are identical. One difference: scikit-learn moves an empty cluster's
centre onto a far-away patient (a patient-level row), here an empty cluster keeps its centre (logged).

Initial centres: given by the study (:func:`random_centres`, seeded draws from the pooled mean and sd),
or a federated k-means++ (:func:`site_local_centres` + :func:`kmeans_plusplus_from_summaries`): each
site summarises its patients by a few local centroids, each the mean of at least ``min_cell`` patients,
and the server runs weighted k-means++ (scikit-learn's) over those summaries. No patient row is sent.

Privacy: a cluster sum over one patient is that patient's feature vector. With ``min_cell > 1`` a site
withholds the sum and count of every cluster holding fewer than ``min_cell`` of its patients (those
patients still get labels; they only do not move the centres), so the result is exact only where every
site's policy allows small cells (``min_cell = 1``).

The rounds over a site's cohort are in :mod:`common.outcomes_site`, the driver is
:func:`common.outcomes.run_kmeans`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.errors import ProtocolError
from common.noise import GaussianNoise
from common.pooled_moments import Moments, check_matrix, require_cohort
from common.protocol import Payload

log = logging.getLogger(__name__)


def assign_labels(X: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """The index of the nearest centre (squared Euclidean distance; first one on ties) for each row."""
    dist = np.square(X[:, None, :] - centres[None, :, :]).sum(axis=2)
    return np.argmin(dist, axis=1).astype(np.int64)


def inertia(X: np.ndarray, centres: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of the rows to their assigned centre."""
    return float(np.square(X - centres[labels]).sum())


def check_centres(centres: np.ndarray, k: int, d: int) -> np.ndarray:
    """``centres`` as a finite (k, d) float array, or a :class:`ProtocolError`."""
    arr = np.asarray(centres, dtype=np.float64)
    if arr.shape != (k, d) or not np.all(np.isfinite(arr)):
        raise ProtocolError("(server)", f"centres have shape {arr.shape} (or non-finite values), expected ({k}, {d})",
                            "send k finite centres with one value per feature")
    return arr


def site_cluster_sums(site_id: str, X: np.ndarray, centres: np.ndarray, previous: np.ndarray | None = None,
                      min_cell: int = 1, min_cohort: int = 1) -> Payload:
    """The site step of one Lloyd iteration: per-cluster sums and counts of the site's patients.

    ``changed`` counts the patients whose nearest centre differs between ``previous`` and ``centres``
    (all of them when ``previous`` is None). Clusters with fewer than ``min_cell`` patients (but not
    none) are withheld: their sum and count are sent as zero and counted in ``suppressed``.
    """
    arr = check_matrix(site_id, X)
    require_cohort(site_id, arr.shape[0], min_cohort)
    c = check_centres(centres, len(np.asarray(centres)), arr.shape[1])
    labels = assign_labels(arr, c)
    k = c.shape[0]
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.zeros_like(c)
    np.add.at(sums, labels, arr)
    if previous is None:
        changed = arr.shape[0]
    else:
        changed = int(np.count_nonzero(assign_labels(arr, check_centres(previous, k, arr.shape[1])) != labels))
    small = (counts > 0) & (counts < min_cell)
    sums[small] = 0.0
    counts[small] = 0.0
    return {"sums": sums, "counts": counts, "changed": changed, "suppressed": int(small.sum()),
            "n": int(arr.shape[0])}


@dataclass(frozen=True)
class NoisyKMeans(GaussianNoise):
    """How a site adds noise to its Lloyd answers (``policy.noise_epsilon``): each patient's standardised row is
    scaled to an L2 norm of at most ``clip``, so one patient moves its cluster's sum by at most ``clip`` and its
    count by 1 (L2 sensitivity ``sqrt(clip^2 + 1)``); sums and counts get the Gaussian noise of that
    sensitivity. A study gets ``rounds`` noisy answers from the site; later rounds repeat the last one (the
    cap does not depend on the data, so the repeat says nothing)."""

    clip: float = 3.0
    rounds: int = 10


def noisy_cluster_sums(site_id: str, X: np.ndarray, centres: np.ndarray, noise: NoisyKMeans,
                       min_cohort: int = 1) -> Payload:
    """The site step of one Lloyd iteration in noisy mode: noisy per-cluster sums of the clipped rows and
    noisy counts (``changed`` is always 1: a count of changed labels would be one more exact release)."""
    arr = check_matrix(site_id, X)
    require_cohort(site_id, arr.shape[0], min_cohort)
    c = check_centres(centres, len(np.asarray(centres)), arr.shape[1])
    labels = assign_labels(arr, c)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    clipped = arr * np.minimum(1.0, noise.clip / np.maximum(norms, 1e-300))
    sums = np.zeros_like(c)
    np.add.at(sums, labels, clipped)
    counts = np.bincount(labels, minlength=c.shape[0]).astype(np.float64)
    sensitivity = float(np.sqrt(noise.clip ** 2 + 1.0))
    noise.charge()
    return {"sums": noise.add(sums, sensitivity), "counts": noise.add(counts, sensitivity), "changed": 1,
            "suppressed": 0, "n": int(arr.shape[0]), "noise_sd": noise.sd(sensitivity)}


@dataclass(frozen=True)
class LloydStep:
    """The server's result of one Lloyd iteration."""

    centres: np.ndarray
    shift: float  # sum over clusters of the squared centre shift (scikit-learn's center_shift_tot)
    changed: int  # labels changed at all sites since the previous centres
    empty: tuple[int, ...]  # clusters without any (unwithheld) patient: they keep their centre
    suppressed: int  # cluster cells withheld by sites
    counts: np.ndarray  # pooled (unwithheld) cluster sizes


def lloyd_update(replies: Mapping[str, Mapping[str, object]], centres: np.ndarray) -> LloydStep:
    """The server step of one Lloyd iteration: new centres = pooled sums / pooled counts."""
    if not replies:
        raise ProtocolError("(none)", "no site sent cluster sums")
    c = np.asarray(centres, dtype=np.float64)
    sums = np.zeros_like(c)
    counts = np.zeros(c.shape[0])
    changed = suppressed = 0
    for site in sorted(replies):
        reply = replies[site]
        try:
            s = np.asarray(reply["sums"], dtype=np.float64)
            n = np.asarray(reply["counts"], dtype=np.float64)
            changed += int(reply["changed"])  # type: ignore[call-overload]
            suppressed += int(reply.get("suppressed", 0))  # type: ignore[call-overload]
        except KeyError as exc:
            raise ProtocolError(site, f"k-means reply lacks {exc}",
                                "run the same fedbiopsy version at every site") from exc
        if s.shape != c.shape or n.shape != (c.shape[0],):
            raise ProtocolError(site, f"k-means reply has sums {s.shape} / counts {n.shape}, expected {c.shape}",
                                "run the same fedbiopsy version at every site")
        noisy = float(reply.get("noise_sd", 0.0)) > 0  # type: ignore[arg-type]
        if not np.all(np.isfinite(s)) or not np.all(np.isfinite(n)) or \
                (not noisy and (np.any(n < 0) or np.any(n != np.round(n)))):
            raise ProtocolError(site, "k-means reply holds non-finite sums or non-integer counts")
        if not noisy and "n" in reply and float(n.sum()) > float(reply["n"]):  # type: ignore[arg-type]
            raise ProtocolError(site, "k-means reply counts more patients in its clusters than it has",
                                "check the site's fedbiopsy version")
        sums += s
        counts += n
    new = c.copy()
    filled = counts >= 1.0  # noisy counts (noise_sd > 0) may be fractional or negative: a cluster needs one patient
    new[filled] = sums[filled] / counts[filled, None]
    empty = tuple(int(j) for j in np.flatnonzero(~filled))
    if empty:
        log.warning("k-means: cluster(s) %s hold no patient; they keep their centre", list(empty))
    shift = float(np.square(new - c).sum())
    return LloydStep(centres=new, shift=shift, changed=changed, empty=empty, suppressed=suppressed, counts=counts)


def kmeans_tolerance(moments: Moments, tol: float) -> float:
    """scikit-learn's absolute tolerance: the mean pooled feature variance times ``tol``."""
    return 0.0 if tol == 0 else float(np.mean(moments.var(ddof=0)) * tol)


def site_local_centres(site_id: str, X: np.ndarray, n_centres: int, min_cell: int, seed: int,
                       min_cohort: int = 1) -> Payload:
    """The site step of the federated k-means++: up to ``n_centres`` local centroids and their sizes.

    The site clusters its own patients (scikit-learn k-means, seeded) into as many clusters as allow
    every cluster at least ``min_cell`` patients; with one cluster the centroid is the site mean.
    """
    from sklearn.cluster import KMeans

    arr = check_matrix(site_id, X)
    require_cohort(site_id, arr.shape[0], min_cohort)
    n = arr.shape[0]
    m = max(1, min(n_centres, n // max(min_cell, 1)))
    while m > 1:
        fit = KMeans(n_clusters=m, n_init=4, random_state=seed).fit(arr)
        counts = np.bincount(fit.labels_, minlength=m)
        if counts.min() >= max(min_cell, 1):
            return {"centres": fit.cluster_centers_.astype(np.float64), "counts": counts.astype(np.float64)}
        m -= 1
    return {"centres": arr.mean(axis=0, keepdims=True), "counts": np.array([float(n)])}


def kmeans_plusplus_from_summaries(replies: Mapping[str, Mapping[str, object]], k: int, seed: int) -> np.ndarray:
    """The server step of the federated k-means++: weighted k-means++ over the sites' local centroids."""
    from sklearn.cluster import kmeans_plusplus

    points, weights = [], []
    for site in sorted(replies):
        try:
            c = np.atleast_2d(np.asarray(replies[site]["centres"], dtype=np.float64))
            w = np.atleast_1d(np.asarray(replies[site]["counts"], dtype=np.float64))
        except KeyError as exc:
            raise ProtocolError(site, f"local-centres reply lacks {exc}") from exc
        if c.shape[0] != w.shape[0] or not np.all(np.isfinite(c)) or np.any(w <= 0):
            raise ProtocolError(site, "local-centres reply has mismatched or invalid centres/counts")
        points.append(c)
        weights.append(w)
    pts = np.concatenate(points)
    if len({p.shape[1] for p in points}) != 1:
        raise ProtocolError("(sites)", "local centres have different numbers of features",
                            "use the same feature columns at every site")
    if pts.shape[0] < k:
        raise ProtocolError("(sites)", f"only {pts.shape[0]} local centroid(s) for k={k} clusters",
                            "lower k, or let sites send more local centres (outcomes.local_centres)")
    centres, _ = kmeans_plusplus(pts, n_clusters=k, sample_weight=np.concatenate(weights), random_state=seed)
    return centres.astype(np.float64)


def random_centres(k: int, mean: np.ndarray, scale: np.ndarray, seed: int) -> np.ndarray:
    """``k`` seeded centres drawn from a normal with the pooled mean and sd (no patient row needed)."""
    rng = np.random.default_rng(seed)
    return np.asarray(mean, dtype=np.float64) + np.asarray(scale, dtype=np.float64) * rng.standard_normal(
        (k, len(mean)))


@dataclass
class LloydLoop:
    """The server's Lloyd loop, one round per :meth:`update`, with scikit-learn's stopping rules.

    Send :meth:`request` to every site, pass their :func:`site_cluster_sums` replies to :meth:`update`
    until it returns True; then :attr:`centres` are final and each site labels its patients with them.
    """

    centres: np.ndarray
    tol: float  # absolute, see :func:`kmeans_tolerance`
    max_iter: int = 300
    previous: np.ndarray | None = None
    n_iter: int = 0
    strict: bool = False  # stopped because no label changed
    converged: bool = False
    suppressed: int = 0
    empty: tuple[int, ...] = ()

    def request(self) -> Payload:
        """What every site needs for the next round."""
        out: Payload = {"centres": np.asarray(self.centres, dtype=np.float64)}
        if self.previous is not None:
            out["previous"] = np.asarray(self.previous, dtype=np.float64)
        return out

    def update(self, replies: Mapping[str, Mapping[str, object]]) -> bool:
        """Apply one round of replies; True when the loop has stopped."""
        step = lloyd_update(replies, self.centres)
        first = self.previous is None
        self.previous, self.centres = self.centres, step.centres
        self.n_iter += 1
        self.suppressed += step.suppressed
        self.empty = step.empty
        if not first and step.changed == 0:
            self.strict = self.converged = True
        elif step.shift <= self.tol:
            self.converged = True
        return self.converged or self.n_iter >= self.max_iter
