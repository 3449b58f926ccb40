"""The reduction protocol: the image-based signature from pooled feature statistics only.

Site step :func:`site_feature_stats` sends its count, feature means and centred crossproduct matrix
(aggregates over at least ``min_cohort`` patients); server step :func:`server_signature` merges them exactly
(:func:`common.pooled_moments.merge_crossproducts`) and fits the signature on the pooled statistics
(:mod:`common.reduction_fit`: variance filter, Pearson pruning, factor analysis with varimax). The server then
broadcasts the signature and each site scores its own patients (:func:`site_signature_scores`).
:func:`run_reduction` drives the two rounds through any :class:`common.protocol.Query`: the Flower phase
(:mod:`server.phases.reduction`) and, over in-memory sites, :func:`run_reduction_in_memory`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.config import ReductionConfig
from common.errors import PolicyError, ProtocolError
from common.feature_matrix import feature_matrix
from common.pooled_moments import merge_crossproducts
from common.protocol import InMemoryQuery, Payload, Query, SiteFunction, Wire
from common.reduction_fit import signature_from_stats
from common.reduction_signature import PooledStats, ReductionError, ReductionSettings, Signature

log = logging.getLogger(__name__)

FEATURESTATS, SCORES = "featurestats", "signature_scores"

__all__ = [
    "FEATURESTATS", "SCORES", "InMemoryReductionSite", "ReductionError", "ReductionResult", "ReductionSettings",
    "Signature", "federated_feature_reduction", "merge_feature_stats", "run_reduction",
    "run_reduction_in_memory", "server_signature", "settings_from_config", "site_feature_stats",
    "site_signature_scores",
]


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


def _names(reply: Mapping[str, object], site: str) -> list[str]:
    value = reply.get("features")
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(site, "featurestats reply lacks the feature names", "run the same fedbiopsy everywhere")
    return [str(f) for f in value]


def _stats(site: str, reply: Mapping[str, object], features: tuple[str, ...], first: str
           ) -> tuple[int, np.ndarray, np.ndarray]:
    """One site's (n, mean, cross) in the order of ``features``; raises naming the site on a bad reply."""
    p = len(features)
    theirs = _names(reply, site)
    if set(theirs) != set(features) or len(theirs) != p:
        missing, extra = sorted(set(features) - set(theirs))[:10], sorted(set(theirs) - set(features))[:10]
        raise ProtocolError(site, f"its feature columns differ from site {first!r}'s: missing {missing}, "
                            f"extra {extra}", "extract and harmonise the same features everywhere")
    order = [theirs.index(f) for f in features]
    try:
        n = int(reply["n_cases"])  # type: ignore[call-overload]
        m = np.asarray(reply["mean"], dtype=np.float64)
        c = np.asarray(reply["cross"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(site, f"malformed featurestats reply ({exc})",
                            "run the same fedbiopsy version everywhere") from exc
    if m.shape != (p,) or c.shape != (p, p) or not (np.all(np.isfinite(m)) and np.all(np.isfinite(c))) or n < 1:
        raise ProtocolError(site, "malformed featurestats reply", "run the same fedbiopsy version everywhere")
    return n, m[order], c[np.ix_(order, order)]


def merge_feature_stats(replies: Mapping[str, Mapping[str, object]]) -> PooledStats:
    """Merge the sites' statistics exactly; raises naming a site whose features or reply differ."""
    if not replies:
        raise ProtocolError("(none)", "no site answered the featurestats query")
    sites = sorted(replies)
    features = tuple(_names(replies[sites[0]], sites[0]))
    n, mean, cross = merge_crossproducts(_stats(site, replies[site], features, sites[0]) for site in sites)
    return PooledStats(features, n, mean, cross)


def server_signature(replies: Mapping[str, Mapping[str, object]], settings: ReductionSettings) -> Signature:
    """The server step: merge the sites' statistics and derive the signature."""
    return signature_from_stats(merge_feature_stats(replies), settings)


# ============================================================================================ driver


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


# ============================================================================================ in memory


@dataclass
class InMemoryReductionSite:
    """A site held in this process: its feature table, its policy's ``min_cohort`` and (after the last round)
    its patients' factor scores."""

    site_id: str
    table: pd.DataFrame
    min_cohort: int = 1
    scores: pd.DataFrame | None = None


def _scores_in_memory(site: InMemoryReductionSite, request: Payload) -> Payload:
    """The scores round at an in-memory site: the scores stay in the site's state, the count goes."""
    site.scores, reply = site_signature_scores(site.site_id, site.table, request, site.min_cohort)
    return reply


IN_MEMORY_STEPS: dict[str, SiteFunction] = {
    FEATURESTATS: lambda site, request: site_feature_stats(site.site_id, site.table, site.min_cohort),
    SCORES: _scores_in_memory,
}
"""The site step of each action over an :class:`InMemoryReductionSite`."""


def run_reduction_in_memory(features: Mapping[str, pd.DataFrame], settings: ReductionSettings, *,
                            min_cohort: int = 1, wire: Wire | None = None
                            ) -> tuple[ReductionResult, dict[str, pd.DataFrame]]:
    """:func:`run_reduction` over in-memory sites; returns the result and each site's factor scores."""
    sites = {name: InMemoryReductionSite(name, table, min_cohort) for name, table in features.items()}
    result = run_reduction(InMemoryQuery(sites, IN_MEMORY_STEPS, wire=wire), settings)
    return result, {name: sites[name].scores for name in features}  # type: ignore[misc]


def federated_feature_reduction(features: Mapping[str, pd.DataFrame], *, variance_threshold: float,
                                correlation_threshold: float, n_factors: int) -> Signature:
    """Federated low-variance filter, Pearson pruning and varimax factor analysis on the pooled correlations.

    Returns the :class:`common.reduction_signature.Signature`; it unpacks as ``kept, correlation, loadings``.
    """
    settings = ReductionSettings(variance_threshold=variance_threshold, correlation_threshold=correlation_threshold,
                                 n_factors=n_factors)
    result, _ = run_reduction_in_memory(features, settings)
    return result.signature
