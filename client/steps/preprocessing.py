"""Site steps of the preprocessing phase: Nyúl landmarks (aggregates only) and receiving the global plan.

``nyul_landmarks``: every valid case runs the study's preprocessing up to normalisation (with the target
spacing the server sends), its foreground landmarks are measured, and only their mean over the site's cases
(:func:`common.nyul.site_nyul`, at least ``min_cohort`` cases) is returned.
``preprocessing_plan``: the server's plan is checked and stored as ``derived/plan.json``; the site answers
with its sha256 only.
"""

from __future__ import annotations

import logging

import numpy as np

from client.preprocessing.normalise import nyul_case_landmarks
from client.preprocessing.pipeline import build_pipeline, load_case
from client.steps.base import Payload, SiteStep, work_dir
from common.config import StudyConfig
from common.errors import ConfigError
from common.nyul import site_nyul
from common.plan import parse_plan, write_plan
from common.sitedata import Site

log = logging.getLogger(__name__)
PLAN_FILE = "plan.json"


def nyul_landmarks_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Mean Nyúl landmarks (mapped onto the standard range) over the site's cases, per sequence."""
    cfg = study.preprocessing
    spacing = payload.get("target_spacing")
    target = tuple(float(s) for s in np.asarray(spacing).ravel()) if spacing is not None else None
    pipeline = build_pipeline(cfg, target, None, include_normalise=False)
    landmarks = []
    for case in site.cases:
        volumes = pipeline(load_case(case, study.sequences, study.reference_sequence))
        landmarks.append(nyul_case_landmarks(volumes, cfg.normalise.nyul_percentiles))
    log.info("site %s: Nyúl landmarks over %d case(s) after %s", site.site_id, len(landmarks), pipeline.names)
    return site_nyul(site.site_id, landmarks, study.sequences, cfg.normalise.nyul_percentiles,
                     cfg.normalise.nyul_scale, site.config.policy.min_cohort)


def store_plan_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Check the server's plan against the study and keep it at the site; reply with its hash."""
    plan = parse_plan(str(payload.get("plan_json", "")), "plan from the server")
    if plan.study_hash != study.hash:
        raise ConfigError("plan from the server", "was built for another study config",
                          "the server must send the plan of the study it runs")
    sha = write_plan(plan, work_dir(site) / PLAN_FILE)
    log.info("site %s: stored the preprocessing plan %s", site.site_id, sha[:12])
    return {"plan_sha256": sha}


STEPS: dict[str, SiteStep] = {
    "nyul_landmarks": SiteStep("preprocessing", nyul_landmarks_step),
    "preprocessing_plan": SiteStep("preprocessing", store_plan_step),
}
