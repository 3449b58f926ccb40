"""Site steps of the prognosis phase: multivariable Cox on the study's covariates, and its risk tables.

The covariates come from ``clinical.csv`` (a tabular site holds nothing else) and, when the study names one of
the site's feature tables (``prognosis.table``), from ``derived/<table>`` joined on ``patient_id``. The site's
policy decides what may be used: a clinical column only where ``policy.columns`` lists it for that use
(covariate, survival, split), a feature table only where ``policy.feature_tables`` lists it, Newton sums only
with ``policy.cox_newton``, exact times only with ``policy.exact_outcomes``. One step per action of
:mod:`common.prognosis_site`: each loads the site's table into a :class:`~common.prognosis_site.PrognosisSite`
and calls the same site function as the in-memory tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pandas as pd

from client.guard import require_column, require_name
from client.steps.base import SiteStep, release_ledger, work_dir
from common.config import StudyConfig
from common.errors import PolicyError, SiteDataError
from common.outcomes_site import OutcomesCohort, time_bin
from common.prognosis_site import PROGNOSIS_ACTIONS, PROGNOSIS_STEPS, PrognosisSite
from common.protocol import Payload
from common.sitedata import Site, read_clinical
from common.tabular import covariate_design, rare_levels
from common.validation import TABULAR_COLUMNS

log = logging.getLogger(__name__)
CLINICAL = "clinical.csv"


def prognosis_frame(site: Site, study: StudyConfig) -> tuple[pd.DataFrame, str]:
    """The site's table for the study's prognosis columns (indexed by patient id), and what it was read from;
    every clinical column it uses is checked against the site's policy first."""
    cfg, policy, sid = study.prognosis, site.config.policy, site.site_id
    clinical = read_clinical(site.root, TABULAR_COLUMNS).set_index("patient_id")
    clinical.index = clinical.index.astype(str)
    source = CLINICAL
    frame = clinical
    if cfg.table != CLINICAL:
        require_name(sid, cfg.table, policy.feature_tables, "feature table")
        path = work_dir(site) / cfg.table
        if not path.is_file():
            raise SiteDataError(path, "the study's feature table is not at the site",
                                "run the phase that writes it first (features, harmonisation or reduction)")
        table = pd.read_csv(path, dtype={"patient_id": str}).set_index("patient_id")
        table.index = table.index.astype(str)
        clash = [c for c in table.columns if c in clinical.columns]
        frame = clinical.join(table.drop(columns=clash), how="inner")
        source = f"{CLINICAL} + {cfg.table}"
    from_clinical = set(clinical.columns)
    require_column(sid, policy, cfg.duration, "survival", "continuous")
    require_column(sid, policy, cfg.event, "survival", "categorical")
    if cfg.split_column:
        require_column(sid, policy, cfg.split_column, "split", "categorical")
    for col in cfg.covariates:
        if col in from_clinical or cfg.table == CLINICAL:
            require_column(sid, policy, col, "covariate", "categorical" if col in cfg.levels else "continuous")
    return frame, source


def prognosis_site(site: Site, study: StudyConfig) -> PrognosisSite:
    """The site's cohorts by split, limited by its policy (cells, time bins, ledger, Newton sums)."""
    policy = site.config.policy
    if policy.noise_epsilon is not None:
        raise PolicyError(site.site_id, "noisy_release", "Cox sums were requested; this site releases outcomes "
                          "only as noisy survival tables")
    frame, source = prognosis_frame(site, study)
    # the patients a reply covers: complete in every column the site could let a study use, not only the study's
    usable = tuple(c for c, spec in policy.columns.items() if "covariate" in spec.uses and c in frame.columns)
    table_cols = () if study.prognosis.table == CLINICAL else tuple(
        c for c in frame.columns if c not in policy.columns and c not in ("site_id", "study"))
    try:
        design = covariate_design(frame, study.prognosis, complete_over=usable + table_cols)
    except ValueError as err:
        raise SiteDataError(site.root / CLINICAL, str(err), "correct the column at the site") from err
    rare = rare_levels(design, policy.cell_floor)
    if rare:
        raise PolicyError(site.site_id, "min_cell", f"{rare} level(s) of a categorical covariate held by fewer than "
                          f"{policy.cell_floor} patients (a split's)")
    if design.dropped:
        log.warning("site %s: %d patient(s) with a missing prognosis value left out", site.site_id, design.dropped)
    ledger = release_ledger(site)
    cohorts: dict[str, OutcomesCohort] = {}
    for split in sorted(set(design.split.tolist())):
        rows = design.split == split
        cohorts[split] = OutcomesCohort(
            site.site_id, durations=design.durations[rows], events=design.events[rows],
            covariates=design.x[rows], covariate_names=design.names, min_cohort=policy.min_cohort,
            min_cell=policy.cell_floor, exact=bool(policy.exact_outcomes), ledger=ledger,
            time_floor=policy.time_bin_days, study_key=study.hash,
            survival_ids=tuple(i for i, keep in zip(design.ids, rows, strict=True) if keep),
            survival_source=f"{source} {study.prognosis.duration}/{study.prognosis.event}")
    return PrognosisSite(site.site_id, cohorts, newton_allowed=bool(policy.cox_newton),
                         max_bins=policy.histogram_bins, ledger=ledger, study_key=study.hash,
                         feature_table=study.prognosis.table != CLINICAL)


def _step(action: str) -> Callable[[Site, StudyConfig, Payload], Payload]:
    function = PROGNOSIS_STEPS[action]

    def run(site: Site, study: StudyConfig, payload: Payload) -> Payload:
        time_bin(site.site_id, site.config.policy.exact_outcomes, payload)  # refuse exact times before reading
        return function(prognosis_site(site, study), payload)

    return run


STEPS: dict[str, SiteStep] = {action: SiteStep("prognosis", _step(action)) for action in PROGNOSIS_ACTIONS}
