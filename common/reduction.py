"""Federated feature reduction: the image-based signature from pooled moments only.

Site step :func:`site_feature_stats` sends its count, feature means and centred crossproduct matrix
(aggregates over at least ``min_cohort`` patients); server step :func:`server_signature` merges them exactly
(Chan et al.'s pairwise update) and runs, on the pooled statistics:

1. a low-variance filter: keep features whose population variance exceeds ``variance_threshold``
   (scikit-learn's ``VarianceThreshold``);
2. Pearson pruning: pairs with |r| > ``correlation_threshold`` are visited from the most correlated down
   (ties by column order); while both are still kept, the one with the larger mean |r| to the other kept
   features is dropped (on a tie, within 1e-12, the later column);
3. factor analysis on the pooled correlation matrix, scikit-learn's ``FactorAnalysis`` (SVD method) run
   on the correlation matrix instead of the standardised data, then its varimax rotation. Factors are
   ordered by explained variance, each signed so that its largest loading is positive.

:meth:`Signature.scores` gives a patient's factor scores (scikit-learn's ``FactorAnalysis.transform``);
sites compute them locally in the ``signature_scores`` round.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import ReductionConfig
from common.errors import FedBiopsyError, PolicyError, ProtocolError
from common.feature_matrix import feature_matrix

log = logging.getLogger(__name__)

Payload = dict[str, object]
Query = Callable[[str, Payload], Mapping[str, Payload]]
FEATURESTATS, SCORES = "featurestats", "signature_scores"
SIGNATURE_FORMAT = "fedbiopsy-signature/1"
TIE_TOL = 1e-12
SMALL = 1e-12  # scikit-learn's FactorAnalysis floor on noise variances


class ReductionError(FedBiopsyError, ValueError):
    """Settings or pooled statistics with which the reduction cannot run."""


@dataclass(frozen=True)
class ReductionSettings:
    """Thresholds of the reduction and the factor analysis' stopping rule (scikit-learn's defaults)."""

    variance_threshold: float = 0.0
    correlation_threshold: float = 0.95
    n_factors: int = 5
    fa_tol: float = 1e-2
    fa_max_iter: int = 1000

    def __post_init__(self) -> None:
        if self.variance_threshold < 0 or not 0 < self.correlation_threshold <= 1 or self.n_factors < 1:
            raise ReductionError(f"invalid reduction settings {self}: need variance_threshold >= 0, "
                                 "0 < correlation_threshold <= 1, n_factors >= 1")


def settings_from_config(cfg: ReductionConfig) -> ReductionSettings:
    """The reduction settings of a study's ``reduction`` section."""
    return ReductionSettings(variance_threshold=cfg.variance_threshold, correlation_threshold=cfg.correlation_threshold,
                             n_factors=cfg.n_factors, fa_tol=cfg.fa_tol, fa_max_iter=cfg.fa_max_iter)


# ============================================================================================ site side


def site_feature_stats(site_id: str, table: pd.DataFrame, min_cohort: int) -> Payload:
    """The site step: count, means and centred crossproducts of the site's features (patients x features)."""
    x = feature_matrix(site_id, table)
    n = x.shape[0]
    if n < min_cohort:
        raise PolicyError(site_id, "min_cohort", f"{n} patient(s) in the feature table, policy needs {min_cohort}")
    mean = x.mean(axis=0)
    centred = x - mean
    return {"features": [str(c) for c in table.columns], "n_cases": n, "mean": mean, "cross": centred.T @ centred}


def site_signature_scores(site_id: str, table: pd.DataFrame, request: Mapping[str, object],
                          min_cohort: int) -> tuple[pd.DataFrame, Payload]:
    """The final step: the site's factor scores (stay at the site); the reply holds only the count."""
    x = feature_matrix(site_id, table)
    if x.shape[0] < min_cohort:
        raise PolicyError(site_id, "min_cohort", f"{x.shape[0]} patient(s), policy needs {min_cohort}")
    signature = Signature.from_payload(request)
    return signature.scores(table), {"n_cases": x.shape[0]}


# ============================================================================================ server side


@dataclass(frozen=True)
class PooledStats:
    """Pooled count, means and centred crossproduct matrix of the features."""

    features: tuple[str, ...]
    n: int
    mean: np.ndarray
    cross: np.ndarray

    @property
    def variance(self) -> np.ndarray:
        """Population variance (ddof 0), as scikit-learn's VarianceThreshold."""
        return np.diag(self.cross) / self.n

    def correlation(self, idx: np.ndarray) -> np.ndarray:
        c = self.cross[np.ix_(idx, idx)]
        d = np.sqrt(np.diag(c))
        r = c / np.outer(d, d)
        np.fill_diagonal(r, 1.0)
        return r


def _names(reply: Mapping[str, object], site: str) -> list[str]:
    value = reply.get("features")
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(site, "featurestats reply lacks the feature names", "run the same fedbiopsy everywhere")
    return [str(f) for f in value]


def merge_feature_stats(replies: Mapping[str, Mapping[str, object]]) -> PooledStats:
    """Merge the sites' statistics exactly; raises naming a site whose features or reply differ."""
    if not replies:
        raise ProtocolError("(none)", "no site answered the featurestats query")
    sites = sorted(replies)
    features = tuple(_names(replies[sites[0]], sites[0]))
    p = len(features)
    n_tot, mean, cross = 0, np.zeros(p), np.zeros((p, p))
    for site in sites:
        reply = replies[site]
        theirs = _names(reply, site)
        if set(theirs) != set(features) or len(theirs) != p:
            missing, extra = sorted(set(features) - set(theirs))[:10], sorted(set(theirs) - set(features))[:10]
            raise ProtocolError(site, f"its feature columns differ from site {sites[0]!r}'s: missing {missing}, "
                                f"extra {extra}", "extract and harmonise the same features everywhere")
        order = [theirs.index(f) for f in features]
        n = int(reply["n_cases"])  # type: ignore[call-overload]
        m = np.asarray(reply["mean"], dtype=np.float64)
        c = np.asarray(reply["cross"], dtype=np.float64)
        if m.shape != (p,) or c.shape != (p, p) or not (np.all(np.isfinite(m)) and np.all(np.isfinite(c))) or n < 1:
            raise ProtocolError(site, "malformed featurestats reply", "run the same fedbiopsy version everywhere")
        m, c = m[order], c[np.ix_(order, order)]
        total = n_tot + n
        delta = m - mean
        cross = cross + c + np.outer(delta, delta) * (n_tot * n / total)
        mean = mean + delta * (n / total)
        n_tot = total
    return PooledStats(features, n_tot, mean, cross)


def variance_filter(variance: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of the features whose variance exceeds ``threshold``."""
    return variance > threshold


def prune_correlated(corr: np.ndarray, threshold: float) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """Greedy Pearson pruning (see the module doc); returns the keep mask and (dropped, partner, r) triples."""
    p = corr.shape[0]
    a = np.abs(corr)
    np.fill_diagonal(a, 0.0)
    i_idx, j_idx = np.triu_indices(p, k=1)
    hot = a[i_idx, j_idx] > threshold
    i_idx, j_idx = i_idx[hot], j_idx[hot]
    order = np.lexsort((j_idx, i_idx, -a[i_idx, j_idx]))
    keep = np.ones(p, dtype=bool)
    sums = a.sum(axis=1)
    dropped: list[tuple[int, int, float]] = []
    for k in order:
        i, j = int(i_idx[k]), int(j_idx[k])
        if not (keep[i] and keep[j]):
            continue
        n_other = keep.sum() - 1
        mac_i, mac_j = sums[i] / n_other, sums[j] / n_other
        drop, partner = (i, j) if mac_i > mac_j + TIE_TOL else (j, i)
        keep[drop] = False
        sums -= a[:, drop]
        dropped.append((drop, partner, float(corr[i, j])))
    return keep, dropped


def varimax(loadings: np.ndarray, tol: float = 1e-6, max_iter: int = 100) -> np.ndarray:
    """Varimax rotation of ``loadings`` (features x factors), as scikit-learn's ``_ortho_rotation``."""
    nrow, ncol = loadings.shape
    rotation = np.eye(ncol)
    var = 0.0
    for _ in range(max_iter):
        comp_rot = loadings @ rotation
        tmp = comp_rot * ((comp_rot**2).sum(axis=0) / nrow)
        u, s, v = np.linalg.svd(loadings.T @ (comp_rot**3 - tmp))
        rotation = u @ v
        var_new = float(np.sum(s))
        if var != 0 and var_new < var * (1 + tol):
            break
        var = var_new
    return loadings @ rotation


def factor_analysis(corr: np.ndarray, n_factors: int, n_samples: int, tol: float = 1e-2,
                    max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's FactorAnalysis (SVD method) on standardised data, from their correlation matrix.

    The SVD of the scaled data ``Z / (sqrt(psi) sqrt(n))`` is the eigendecomposition of
    ``R / (sqrt(psi) sqrt(psi)')``, so the iterations are the same. Returns (unrotated loadings
    features x factors, noise variances, iterations).
    """
    from scipy.linalg import eigh

    p = corr.shape[0]
    if not 1 <= n_factors <= p:
        raise ReductionError(f"n_factors={n_factors} but {p} feature(s) are kept; lower n_factors or the pruning")
    var = np.diag(corr).copy()
    psi = np.ones(p)
    llconst = p * math.log(2.0 * math.pi) + n_factors
    old_ll = -np.inf
    w = np.zeros((n_factors, p))
    it = 0
    for it in range(max_iter):  # noqa: B007 - the count is returned
        sqrt_psi = np.sqrt(psi) + SMALL
        m = corr / np.outer(sqrt_psi, sqrt_psi)
        evals, evecs = eigh(m, subset_by_index=[p - n_factors, p - 1])
        s, vt = evals[::-1], evecs[:, ::-1].T
        unexp_var = float(np.trace(m) - s.sum())
        w = np.sqrt(np.maximum(s - 1.0, 0.0))[:, None] * vt * sqrt_psi
        ll = (llconst + np.sum(np.log(s)) + unexp_var + np.sum(np.log(psi))) * (-n_samples / 2.0)
        if ll - old_ll < tol:
            break
        old_ll = ll
        psi = np.maximum(var - np.sum(w**2, axis=0), SMALL)
    else:
        log.warning("factor analysis did not converge in %d iterations", max_iter)
    return w.T, psi, it + 1


@dataclass(frozen=True)
class Signature:
    """The image-based signature: kept features, pooled correlations, factor loadings.

    Unpacks as ``kept, correlation, loadings = signature``.
    """

    settings: ReductionSettings
    n_cases: int
    features: tuple[str, ...]  # every input feature
    dropped: dict[str, str]  # feature -> why it was dropped
    correlation: pd.DataFrame  # over the features that passed the variance filter
    loadings: pd.DataFrame  # kept features x factors (varimax-rotated)
    noise_variance: pd.Series  # kept features
    mean: pd.Series  # pooled mean of the kept features
    std: pd.Series  # pooled population sd of the kept features
    n_iter: int = 0

    @property
    def kept(self) -> list[str]:
        return list(self.loadings.index)

    def __iter__(self) -> Iterator[object]:
        return iter((self.kept, self.correlation, self.loadings))

    def scores(self, table: pd.DataFrame) -> pd.DataFrame:
        """Factor scores of patients (rows): scikit-learn's ``FactorAnalysis.transform`` on standardised data."""
        missing = [f for f in self.kept if f not in table.columns]
        if missing:
            raise ReductionError(f"feature(s) {missing[:10]} of the signature are missing from the table")
        z = (table[self.kept].to_numpy(dtype=np.float64) - self.mean.to_numpy()) / self.std.to_numpy()
        comp = self.loadings.to_numpy().T  # factors x features
        wpsi = comp / self.noise_variance.to_numpy()
        cov_z = np.linalg.inv(np.eye(comp.shape[0]) + wpsi @ comp.T)
        return pd.DataFrame((z @ wpsi.T) @ cov_z, index=table.index, columns=list(self.loadings.columns))

    # ----------------------------------------------------------------------------- wire and storage

    def _meta(self) -> str:
        return json.dumps({"format": SIGNATURE_FORMAT, "settings": asdict(self.settings), "n_cases": self.n_cases,
                           "features": list(self.features), "dropped": self.dropped,
                           "correlated": list(self.correlation.index), "kept": self.kept,
                           "factors": list(self.loadings.columns), "n_iter": self.n_iter}, sort_keys=True)

    def to_payload(self) -> Payload:
        """What the server broadcasts so that sites can score their patients (no correlation matrix)."""
        return {"signature": self._meta(), "loadings": self.loadings.to_numpy(),
                "noise_variance": self.noise_variance.to_numpy(), "mean": self.mean.to_numpy(),
                "std": self.std.to_numpy()}

    @classmethod
    def from_payload(cls, payload: Mapping[str, object], correlation: np.ndarray | None = None) -> Signature:
        meta = json.loads(str(payload["signature"]))
        if meta.get("format") != SIGNATURE_FORMAT:
            raise ReductionError(f"not a {SIGNATURE_FORMAT} signature (format {meta.get('format')!r})")
        kept, factors, corr_names = meta["kept"], meta["factors"], meta["correlated"]
        corr = np.full((len(corr_names), len(corr_names)), np.nan) if correlation is None else correlation
        return cls(
            settings=ReductionSettings(**meta["settings"]), n_cases=int(meta["n_cases"]),
            features=tuple(meta["features"]), dropped=dict(meta["dropped"]),
            correlation=pd.DataFrame(corr, index=corr_names, columns=corr_names),
            loadings=pd.DataFrame(np.asarray(payload["loadings"], dtype=np.float64), index=kept, columns=factors),
            noise_variance=pd.Series(np.asarray(payload["noise_variance"], dtype=np.float64), index=kept),
            mean=pd.Series(np.asarray(payload["mean"], dtype=np.float64), index=kept),
            std=pd.Series(np.asarray(payload["std"], dtype=np.float64), index=kept), n_iter=int(meta["n_iter"]),
        )

    def save(self, path: Path | str) -> Path:
        """Write the signature as one ``.npz`` (arrays + JSON metadata; no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = self.to_payload()
        with path.open("wb") as fh:
            np.savez(fh, meta=np.array(payload.pop("signature")), correlation=self.correlation.to_numpy(),
                     **payload)  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: Path | str) -> Signature:
        with np.load(Path(path), allow_pickle=False) as data:
            payload = {k: data[k] for k in data.files if k not in ("meta", "correlation")}
            payload["signature"] = str(data["meta"])
            return cls.from_payload(payload, correlation=data["correlation"])


def signature_from_stats(stats: PooledStats, settings: ReductionSettings) -> Signature:
    """The reduction on pooled statistics (the same code serves pooled and federated data)."""
    names = np.array(stats.features, dtype=object)
    dropped: dict[str, str] = {}
    var_mask = variance_filter(stats.variance, settings.variance_threshold)
    for f, v in zip(names[~var_mask], stats.variance[~var_mask], strict=True):
        dropped[str(f)] = f"variance {v:.6g} <= {settings.variance_threshold:g}"
    idx = np.flatnonzero(var_mask)
    if idx.size == 0:
        raise ReductionError(f"no feature has a variance above {settings.variance_threshold:g}")
    corr = stats.correlation(idx)
    keep, pairs = prune_correlated(corr, settings.correlation_threshold)
    for drop, partner, r in pairs:
        dropped[str(names[idx[drop]])] = f"|r| = {abs(r):.6f} with {names[idx[partner]]}"
    kept_idx = idx[keep]
    loadings, psi, n_iter = factor_analysis(corr[np.ix_(keep, keep)], settings.n_factors, stats.n,
                                            settings.fa_tol, settings.fa_max_iter)
    rotated = varimax(loadings) if settings.n_factors > 1 else loadings
    order = np.argsort(-np.square(rotated).sum(axis=0), kind="stable")
    rotated = rotated[:, order]
    signs = np.sign(rotated[np.abs(rotated).argmax(axis=0), np.arange(rotated.shape[1])])
    rotated = rotated * np.where(signs == 0, 1.0, signs)
    kept = [str(f) for f in names[kept_idx]]
    corr_names = [str(f) for f in names[idx]]
    return Signature(
        settings=settings, n_cases=stats.n, features=stats.features, dropped=dropped,
        correlation=pd.DataFrame(corr, index=corr_names, columns=corr_names),
        loadings=pd.DataFrame(rotated, index=kept, columns=[f"factor_{k + 1}" for k in range(rotated.shape[1])]),
        noise_variance=pd.Series(psi, index=kept), mean=pd.Series(stats.mean[kept_idx], index=kept),
        std=pd.Series(np.sqrt(stats.variance[kept_idx]), index=kept), n_iter=n_iter,
    )


def server_signature(replies: Mapping[str, Mapping[str, object]], settings: ReductionSettings) -> Signature:
    """The server step: merge the sites' statistics and derive the signature."""
    return signature_from_stats(merge_feature_stats(replies), settings)


@dataclass(frozen=True)
class ReductionResult:
    """What a federated reduction gives the server: the signature and each site's case count."""

    signature: Signature
    cases: dict[str, int]


def run_reduction(query: Query, settings: ReductionSettings, scores: bool = True) -> ReductionResult:
    """Drive the rounds through ``query(action, payload) -> {site_id: reply}``: statistics, then local scores."""
    replies = query(FEATURESTATS, {})
    signature = server_signature(replies, settings)
    if scores:
        query(SCORES, signature.to_payload())
    log.info("federated reduction: %d of %d feature(s) kept, %d factor(s)", len(signature.kept),
             len(signature.features), settings.n_factors)
    return ReductionResult(signature, {s: int(r["n_cases"]) for s, r in replies.items()})  # type: ignore[call-overload]
