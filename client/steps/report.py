"""Site step for the study report: per-feature moments of the feature table before and after harmonisation.

Only counts, means and standard deviations over the site's cohort (at least ``min_cohort`` patients) leave.
"""

from __future__ import annotations

import numpy as np

from client.features.table import read_feature_table
from client.steps.base import SiteStep, work_dir
from common.config import StudyConfig
from common.errors import PolicyError, SiteDataError
from common.protocol import Payload
from common.report import FEATURE_MOMENTS
from common.sitedata import Site


def feature_moments_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """For each table named by the server, n and per-feature mean and SD of the requested feature columns."""
    columns = [str(c) for c in payload["columns"]]  # type: ignore[attr-defined]
    reply: Payload = {}
    for key, name in (("before", study.harmonisation.features_file), ("after", study.harmonisation.output_file)):
        path = work_dir(site) / name
        if not path.is_file():
            raise SiteDataError(path, "feature table is missing", "run the features and harmonisation phases first")
        table = read_feature_table(path)
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise SiteDataError(path, f"lacks feature column(s) {missing[:3]}", "use the study's feature settings")
        if len(table) < site.config.policy.min_cohort:
            raise PolicyError(site.site_id, "min_cohort", f"{len(table)} patient(s) in {name}, policy needs "
                              f"{site.config.policy.min_cohort}")
        values = table[columns].to_numpy(dtype=np.float64)
        reply[f"{key}/n"] = int(values.shape[0])
        reply[f"{key}/mean"] = values.mean(axis=0)
        reply[f"{key}/sd"] = values.std(axis=0, ddof=1)
    return reply


STEPS: dict[str, SiteStep] = {FEATURE_MOMENTS: SiteStep("harmonisation", feature_moments_step)}
