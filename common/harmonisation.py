"""The harmonisation protocol: federated ComBat, exactly equal to neuroCombat on the pooled data (d-ComBat).

Site steps (:mod:`common.harmonisation_site`) and server steps (:mod:`common.harmonisation_server`) are
plain functions over a site's cohort and payloads; :func:`run_harmonisation` drives them through any
:class:`common.protocol.Query`: the Flower phase (:mod:`server.phases.harmonisation`) passes its Flower
query, tests and benchmarks an :class:`common.protocol.InMemoryQuery` over in-memory sites
(:func:`run_harmonisation_in_memory`). Rounds, by query action:

=================  =======================================================  ===============================
action             a site sends (aggregates only)                           the server computes
=================  =======================================================  ===============================
combat_summary     feature names, patients per batch, categorical levels    the design (:class:`CombatSpec`)
combat_fit         W'W, W'Y, per-batch count/mean/centred SS of the data    OLS beta, grand mean
combat_var         per-batch residual sums of squares                       pooled variance
combat_batch       per-batch count/mean/centred SS of standardised data     EB estimates of every batch
                   (only when some batch is held by several sites)
combat_apply       its batches' estimates (EB run at the site when each     the stored model
                   batch lies in one site); it harmonises its own data
=================  =======================================================  ===============================

Privacy: every array is a sum over patients of a batch portion or of the whole site, and the site refuses
(:class:`PolicyError`, rule ``min_cohort``) unless every cell of batch x categorical levels that it holds has
at least ``min_cohort`` patients: all the indicator sums of W'Y are then sums over such cells.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from common.combat_model import CombatModel
from common.combat_spec import CombatOptions
from common.config import HarmonisationConfig
from common.harmonisation_server import server_collect, server_eb, server_fit, server_spec, server_var
from common.harmonisation_site import (
    SiteCohort,
    make_cohort,
    site_apply,
    site_batch,
    site_fit,
    site_summary,
    site_var,
)
from common.protocol import InMemoryQuery, Payload, Query, SiteFunction, Wire

log = logging.getLogger(__name__)

SUMMARY, FIT, VAR, BATCH, APPLY = "combat_summary", "combat_fit", "combat_var", "combat_batch", "combat_apply"
ACTIONS: tuple[str, ...] = (SUMMARY, FIT, VAR, BATCH, APPLY)


def options_from_config(cfg: HarmonisationConfig) -> CombatOptions:
    """The ComBat options of a study's ``harmonisation`` section."""
    return CombatOptions(batch=cfg.batch, categorical=cfg.categorical, continuous=cfg.continuous, eb=cfg.eb,
                         parametric=cfg.parametric, mean_only=cfg.mean_only, ref_batch=cfg.ref_batch)


@dataclass(frozen=True)
class CombatResult:
    """What a federated ComBat run gives the server: the fitted model and each site's case count."""

    model: CombatModel
    cases: dict[str, int]
    rounds: tuple[str, ...]


def run_harmonisation(query: Query, options: CombatOptions) -> CombatResult:
    """Drive the rounds through ``query(action, payload) -> {site_id: reply}``; the sites harmonise their data.

    ``query`` must send every round after the first to the sites that answered the first, and fail if one
    of them does not answer (a partial sum would be silently wrong).
    """
    rounds = [SUMMARY]
    summaries = query(SUMMARY, {"options": json.dumps(options.to_dict(), sort_keys=True)})
    spec = server_spec(summaries, options)
    request: Payload = {"spec": spec.to_json()}
    beta, grand = server_fit(query(FIT, request), spec)
    request.update(beta=beta, grand_mean=grand)
    var_pooled = server_var(query(VAR, request), spec)
    request["var_pooled"] = var_pooled
    rounds += [FIT, VAR]
    if spec.spans_sites():
        estimates = server_eb(query(BATCH, request), spec)
        request.update(estimates.as_dict())
        rounds.append(BATCH)
        query(APPLY, request)
    else:
        estimates = server_collect(query(APPLY, request), spec)
    rounds.append(APPLY)
    model = CombatModel(spec=spec, beta=beta, grand_mean=grand, var_pooled=var_pooled, estimates=estimates)
    cases = {s: int(r["n_cases"]) for s, r in summaries.items()}  # type: ignore[call-overload]
    log.info("federated ComBat: %d site(s), %d batch(es), %d feature(s), rounds %s", len(cases), spec.n_batch,
             spec.n_features, rounds)
    return CombatResult(model, cases, tuple(rounds))


# ============================================================================================ in memory


@dataclass
class InMemorySite:
    """A site held in this process: its cohort, its policy's ``min_cohort``, and (after the apply round) its
    harmonised table, with the index and columns of the table it was given."""

    cohort: SiteCohort
    min_cohort: int
    features: pd.DataFrame
    harmonised: pd.DataFrame | None = None


def _apply_in_memory(site: InMemorySite, request: Payload) -> Payload:
    """The apply round at an in-memory site: the harmonised table stays in the site's state, the reply goes."""
    table, reply = site_apply(site.cohort, request, site.min_cohort)
    table = table[[str(c) for c in site.features.columns]]
    table.index, table.columns = site.features.index, site.features.columns
    site.harmonised = table
    return reply


IN_MEMORY_STEPS: dict[str, SiteFunction] = {
    SUMMARY: lambda site, request: site_summary(site.cohort, request, site.min_cohort),
    FIT: lambda site, request: site_fit(site.cohort, request, site.min_cohort),
    VAR: lambda site, request: site_var(site.cohort, request, site.min_cohort),
    BATCH: lambda site, request: site_batch(site.cohort, request, site.min_cohort),
    APPLY: _apply_in_memory,
}
"""The site step of each action over an :class:`InMemorySite` (the functions :class:`InMemoryQuery` calls)."""


def in_memory_sites(features: Mapping[str, pd.DataFrame], covariates: Mapping[str, pd.DataFrame] | None,
                    options: CombatOptions, min_cohort: int = 1) -> dict[str, InMemorySite]:
    """Each site's validated cohort (raises :class:`ProtocolError` naming the site on bad input)."""
    return {site: InMemorySite(make_cohort(site, table, (covariates or {}).get(site), options), min_cohort, table)
            for site, table in features.items()}


def run_harmonisation_in_memory(features: Mapping[str, pd.DataFrame], covariates: Mapping[str, pd.DataFrame] | None,
                                options: CombatOptions, *, min_cohort: int = 1, wire: Wire | None = None
                                ) -> tuple[dict[str, pd.DataFrame], CombatResult]:
    """:func:`run_harmonisation` over in-memory sites; returns each site's harmonised table and the result.

    ``wire`` sees (and may replace) every message, as :class:`common.protocol.InMemoryQuery` passes it.
    """
    sites = in_memory_sites(features, covariates, options, min_cohort)
    result = run_harmonisation(InMemoryQuery(sites, IN_MEMORY_STEPS, wire=wire), options)
    return {name: sites[name].harmonised for name in features}, result  # type: ignore[misc]


def federated_combat(
    features: Mapping[str, pd.DataFrame], covariates: Mapping[str, pd.DataFrame] | None = None, *,
    batch: str | None = None,
    categorical: Sequence[str] = (), continuous: Sequence[str] = (),
    eb: bool = True, parametric: bool = True, mean_only: bool = False, ref_batch: str | None = None,
) -> dict[str, pd.DataFrame]:
    """Federated ComBat over in-memory sites, equal to neuroCombat on the pooled data; rows patients, columns features.

    ``batch``: a column of ``covariates`` holding each patient's batch (None: the site is the batch).
    Returns each site's harmonised table (same index and columns as its input).
    """
    options = CombatOptions(batch=batch, categorical=tuple(categorical), continuous=tuple(continuous), eb=eb,
                            parametric=parametric, mean_only=mean_only, ref_batch=ref_batch)
    harmonised, _ = run_harmonisation_in_memory(features, covariates, options)
    return harmonised
