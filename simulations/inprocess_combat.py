"""In-process federated harmonisation and feature reduction: the sites' and the server's steps in turn.

The same functions as the Flower phases (``query.combat_*``, ``query.featurestats``) run here; only the
transport differs. ``wire`` (tests) sees, and may replace, every message: ``wire(direction, action, site,
payload) -> payload`` with direction ``"request"`` (server to site) or ``"reply"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from common.combat import CombatOptions, CombatResult
    from common.reduction import ReductionResult, ReductionSettings, Signature

Payload = dict[str, object]
Wire = Callable[[str, str, str, Payload], Payload]


def _passthrough(direction: str, action: str, site: str, payload: Payload) -> Payload:
    return payload


def run_combat_in_process(features: Mapping[str, pd.DataFrame], covariates: Mapping[str, pd.DataFrame] | None,
                          options: CombatOptions, *, min_cohort: int = 1, wire: Wire | None = None
                          ) -> tuple[dict[str, pd.DataFrame], CombatResult]:
    """Federated ComBat over in-memory sites; returns the harmonised tables and the fitted model."""
    from common.combat import APPLY, SITE_FUNCTIONS, make_cohort, run_combat, site_apply

    send = wire or _passthrough
    cohorts = {site: make_cohort(site, table, (covariates or {}).get(site), options)
               for site, table in features.items()}
    harmonised: dict[str, pd.DataFrame] = {}

    def query(action: str, payload: Payload) -> dict[str, Payload]:
        replies = {}
        for site, cohort in cohorts.items():
            request = send("request", action, site, dict(payload))
            if action == APPLY:
                table, reply = site_apply(cohort, request, min_cohort)
                original = features[site]
                table = table[[str(c) for c in original.columns]]
                table.index, table.columns = original.index, original.columns
                harmonised[site] = table
            else:
                reply = SITE_FUNCTIONS[action](cohort, request, min_cohort)
            replies[site] = send("reply", action, site, reply)
        return replies

    result = run_combat(query, options)
    return {site: harmonised[site] for site in features}, result


def federated_combat(
    features: dict[str, pd.DataFrame], covariates: dict[str, pd.DataFrame] | None = None, *,
    batch: str | None = None,
    categorical: Sequence[str] = (), continuous: Sequence[str] = (),
    eb: bool = True, parametric: bool = True, mean_only: bool = False, ref_batch: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Federated ComBat, equal to neuroCombat on the pooled data; rows are patients, columns features.

    ``batch``: a column of ``covariates`` holding each patient's batch (None: the site is the batch).
    Returns each site's harmonised table (same index and columns as its input).
    """
    from common.combat import CombatOptions

    options = CombatOptions(batch=batch, categorical=tuple(categorical), continuous=tuple(continuous), eb=eb,
                            parametric=parametric, mean_only=mean_only, ref_batch=ref_batch)
    harmonised, _ = run_combat_in_process(features, covariates, options)
    return harmonised


def run_reduction_in_process(features: Mapping[str, pd.DataFrame], settings: ReductionSettings, *,
                             min_cohort: int = 1, wire: Wire | None = None
                             ) -> tuple[ReductionResult, dict[str, pd.DataFrame]]:
    """Federated feature reduction over in-memory sites; returns the result and each site's factor scores."""
    from common.reduction import FEATURESTATS, run_reduction, site_feature_stats, site_signature_scores

    send = wire or _passthrough
    scores: dict[str, pd.DataFrame] = {}

    def query(action: str, payload: Payload) -> dict[str, Payload]:
        replies = {}
        for site, table in features.items():
            request = send("request", action, site, dict(payload))
            if action == FEATURESTATS:
                reply = site_feature_stats(site, table, min_cohort)
            else:
                scores[site], reply = site_signature_scores(site, table, request, min_cohort)
            replies[site] = send("reply", action, site, reply)
        return replies

    return run_reduction(query, settings), scores


def federated_feature_reduction(features: dict[str, pd.DataFrame], *, variance_threshold: float,
                                correlation_threshold: float, n_factors: int) -> Signature:
    """Federated low-variance filter, Pearson pruning and varimax factor analysis on the pooled correlations.

    Returns the :class:`common.reduction.Signature`; it unpacks as ``kept, correlation, loadings``.
    """
    from common.reduction import ReductionSettings

    settings = ReductionSettings(variance_threshold=variance_threshold, correlation_threshold=correlation_threshold,
                                 n_factors=n_factors)
    result, _ = run_reduction_in_process(features, settings)
    return result.signature
