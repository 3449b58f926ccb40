"""Site steps of the harmonisation protocol: federated ComBat over the site's feature table.

Reads ``work_dir(site)/<harmonisation.features_file>`` (index ``patient_id``, numeric feature columns) and
the covariates named in the study's ``harmonisation`` section from ``clinical.csv``; the last round writes
``work_dir(site)/<harmonisation.output_file>``. Replies are the aggregates of :mod:`common.harmonisation_site`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from client.steps.base import SiteStep, work_dir
from client.steps.inputs import check_feature_inputs
from common.combat_model import CombatModel
from common.config import HarmonisationConfig, StudyConfig
from common.errors import SiteDataError
from common.harmonisation import APPLY, BATCH, FIT, SUMMARY, VAR, options_from_config
from common.harmonisation_site import SiteCohort, make_cohort, site_apply, site_batch, site_fit, site_summary, site_var
from common.protocol import Payload
from common.sitedata import Site, read_clinical

log = logging.getLogger(__name__)


def read_feature_table(path: Path) -> pd.DataFrame:
    """A site's feature CSV (index ``patient_id`` as strings); raises naming the file and the fix."""
    if not path.is_file():
        raise SiteDataError(path, "the feature table is missing",
                            "run the features phase first (or write patient_id + numeric feature columns)")
    try:
        frame = pd.read_csv(path, dtype={"patient_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SiteDataError(path, f"cannot be parsed as CSV ({exc})", "write it as comma-separated UTF-8") from exc
    if "patient_id" not in frame.columns:
        raise SiteDataError(path, "has no patient_id column", "write the patient ids in a patient_id column")
    return frame.set_index("patient_id")


def count_rows(path: Path, fallback: int) -> int:
    """Rows of a CSV table (``fallback`` when it does not exist yet: the step then explains what is missing)."""
    if not path.is_file():
        return fallback
    with path.open("rb") as fh:
        return max(sum(1 for line in fh if line.strip()) - 1, 0)


def _features_path(site: Site, study: StudyConfig) -> Path:
    return work_dir(site) / study.harmonisation.features_file


def load_cohort(site: Site, study: StudyConfig) -> SiteCohort:
    """The site's feature table and covariates, validated for ComBat."""
    return _cohort_and_passthrough(site, study)[0]


def _cohort_and_passthrough(site: Site, study: StudyConfig) -> tuple[SiteCohort, pd.DataFrame]:
    """The ComBat cohort, and the columns of the same table that pass ComBat unchanged (:func:`_unharmonised`)."""
    options = options_from_config(study.harmonisation)
    check_feature_inputs(site, study)
    features = read_feature_table(_features_path(site, study))
    passthrough = _unharmonised(features, study)
    covariates = read_clinical(site.root).set_index("patient_id") if options.covariate_columns else None
    cohort = make_cohort(site.site_id, features.drop(columns=passthrough), covariates, options)
    return cohort, features[passthrough].set_axis(features.index.astype(str), axis=0)


def _unharmonised(features: pd.DataFrame, study: StudyConfig) -> list[str]:
    """Columns copied past ComBat unchanged (the habitat fractions of a 4D study, see
    :meth:`common.config_maps.MapsConfig.unharmonised_columns`)."""
    return study.maps.unharmonised_columns([str(c) for c in features.columns]) if study.four_d else []


def _step(fn: Callable[[SiteCohort, Payload, int], Payload]) -> Callable[[Site, StudyConfig, Payload], Payload]:
    def run(site: Site, study: StudyConfig, payload: Payload) -> Payload:
        return fn(load_cohort(site, study), payload, site.config.policy.min_cohort)

    return run


def apply_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Harmonise the site's table with the federated model and write it under ``derived/``."""
    cohort, passthrough = _cohort_and_passthrough(site, study)
    table, reply = site_apply(cohort, payload, site.config.policy.min_cohort)
    out = work_dir(site) / study.harmonisation.output_file
    if not passthrough.columns.empty:
        table = table.join(passthrough)
    table.index.name = "patient_id"
    table.to_csv(out)
    log.info("site %s: %d case(s) x %d feature(s) harmonised -> %s", site.site_id, *table.shape, out)
    return reply


def harmonise_with_model(site: Site, model: CombatModel, features_file: str = "features.csv",
                         output_file: str | None = "features_harmonised.csv"
                         ) -> tuple[pd.DataFrame, CombatModel, tuple[str, ...]]:
    """Harmonise a site's table with a stored model, entirely at the site (no message is sent).

    New cases of a batch the model knows are transformed; a batch it has not seen (a site joining later)
    is first estimated from this site's patients (:meth:`CombatModel.with_new_batches`). Returns the table,
    the model (extended with the new batches) and the new batches; writes the table unless ``output_file``
    is None.
    """
    options = model.spec.options
    features = read_feature_table(work_dir(site) / features_file)
    covariates = read_clinical(site.root).set_index("patient_id") if options.covariate_columns else None
    cohort = make_cohort(site.site_id, features, covariates, options)
    new = tuple(sorted(set(cohort.labels) - set(model.batches)))
    if new:
        rows = [i for i, lab in enumerate(cohort.labels) if lab in new]
        cov = None if cohort.covariates is None else cohort.covariates.iloc[rows]
        model = model.with_new_batches(cohort.features.iloc[rows], [cohort.labels[i] for i in rows], cov)
        log.info("site %s: batch(es) %s estimated from %d local case(s)", site.site_id, list(new), len(rows))
    out = pd.DataFrame(model.transform(cohort.features, cohort.labels, cohort.covariates),
                       index=pd.Index(cohort.features.index, name="patient_id"), columns=list(model.spec.features))
    if output_file is not None:
        out.to_csv(work_dir(site) / output_file)
    return out, model, new


def _n_rows(site: Site) -> int:
    # the policy check sees only the site: count the default table; every step re-checks the study's own table
    return count_rows(work_dir(site) / HarmonisationConfig().features_file, len(site.cases))


STEPS: dict[str, SiteStep] = {
    SUMMARY: SiteStep("harmonisation", _step(site_summary), _n_rows),
    FIT: SiteStep("harmonisation", _step(site_fit), _n_rows),
    VAR: SiteStep("harmonisation", _step(site_var), _n_rows),
    BATCH: SiteStep("harmonisation", _step(site_batch), _n_rows),
    APPLY: SiteStep("harmonisation", apply_step, _n_rows),
}
