"""Site step of the radiogenomics phase: the two genomic groups' moments of the study's imaging features.

The features come from one of the site's derived tables (``policy.feature_tables``), the genomic column from
``clinical.csv`` where ``policy.columns`` lists it for use ``genomic``. Rows without a feature value or with a
genomic value outside the study's two levels are left out (counted in the site's log only).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from client.guard import require_column, require_name
from client.steps.base import SiteStep, release_ledger, work_dir
from common.config import StudyConfig
from common.errors import SiteDataError
from common.protocol import Payload
from common.radiogenomics import ASSOCIATION_MOMENTS, AssociationSite, site_association_moments
from common.sitedata import Site, read_clinical
from common.validation import TABULAR_COLUMNS

log = logging.getLogger(__name__)
_NOT_FEATURES = {"patient_id", "site_id", "study"}


def association_site(site: Site, study: StudyConfig) -> AssociationSite:
    """The site's features and genomic groups, after the policy's checks."""
    cfg, policy, sid = study.radiogenomics, site.config.policy, site.site_id
    require_name(sid, cfg.table, policy.feature_tables, "feature table")
    require_column(sid, policy, cfg.column, "genomic", "categorical")
    path = work_dir(site) / cfg.table
    if not path.is_file():
        raise SiteDataError(path, "the study's feature table is not at the site",
                            "run the phase that writes it first (harmonisation or reduction)")
    table = pd.read_csv(path, dtype={"patient_id": str}).set_index("patient_id")
    names = list(cfg.features) or [c for c in table.columns
                                   if c not in _NOT_FEATURES and pd.api.types.is_numeric_dtype(table[c])]
    missing = [c for c in names if c not in table.columns]
    if missing or not names:
        raise SiteDataError(path, f"feature column(s) {missing or 'none'} not in the table",
                            "name columns of the table in radiogenomics.features")
    clinical = read_clinical(site.root, TABULAR_COLUMNS).set_index("patient_id")
    if cfg.column not in clinical.columns:
        raise SiteDataError(site.root / "clinical.csv", f"no column {cfg.column!r}",
                            "add it or set radiogenomics.column")
    genomic = clinical[cfg.column].astype("string").str.strip()
    joined = table[names].join(genomic.rename("__group"), how="inner")
    values = joined[names].apply(pd.to_numeric, errors="coerce")
    level = joined["__group"].map({cfg.levels[0]: 0, cfg.levels[1]: 1})
    ok = values.notna().all(axis=1) & level.notna()
    if not ok.all():
        log.warning("site %s: %d patient(s) without the features or a level of %r left out", sid, int((~ok).sum()),
                    cfg.column)
    return AssociationSite(sid, values[ok].to_numpy(np.float64), tuple(names), level[ok].to_numpy(np.int64),
                           ids=tuple(str(i) for i in joined.index[ok]), min_cohort=policy.min_cohort,
                           min_cell=policy.cell_floor, ledger=release_ledger(site), study_key=study.hash)


def _run(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    return site_association_moments(association_site(site, study), payload)


STEPS: dict[str, SiteStep] = {ASSOCIATION_MOMENTS: SiteStep("radiogenomics", _run)}
