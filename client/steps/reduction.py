"""Site steps of the reduction phase: feature statistics for the server, then the site's factor scores.

Reads ``work_dir(site)/<reduction.input_file>`` (by default the harmonised table) and writes the patients'
signature scores to ``work_dir(site)/<reduction.scores_file>``; both stay at the site.
"""

from __future__ import annotations

import logging

import pandas as pd

from client.steps.base import SiteStep, work_dir
from client.steps.harmonisation import count_rows, read_feature_table
from client.steps.inputs import check_feature_inputs
from common.config import ReductionConfig, StudyConfig
from common.protocol import Payload
from common.reduction import FEATURESTATS, SCORES, site_feature_stats, site_signature_scores
from common.sitedata import Site

log = logging.getLogger(__name__)


def _table(site: Site, study: StudyConfig) -> pd.DataFrame:
    check_feature_inputs(site, study)
    return read_feature_table(work_dir(site) / study.reduction.input_file)


def featurestats_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Count, means and centred crossproducts of the site's (harmonised) features."""
    return site_feature_stats(site.site_id, _table(site, study), site.config.policy.min_cohort)


def scores_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Score the site's patients on the signature's factors and keep the table at the site."""
    scores, reply = site_signature_scores(site.site_id, _table(site, study), payload, site.config.policy.min_cohort)
    out = work_dir(site) / study.reduction.scores_file
    scores.index.name = "patient_id"
    scores.to_csv(out)
    log.info("site %s: signature scores of %d case(s) -> %s", site.site_id, len(scores), out)
    return reply


def _n_rows(site: Site) -> int:
    # the policy check sees only the site: count the default table; every step re-checks the study's own table
    return count_rows(work_dir(site) / str(ReductionConfig.model_fields["input_file"].default), len(site.cases))


STEPS: dict[str, SiteStep] = {
    FEATURESTATS: SiteStep("reduction", featurestats_step, _n_rows),
    SCORES: SiteStep("reduction", scores_step, _n_rows),
}
