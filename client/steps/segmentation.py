"""Site steps of the segmentation phase: the cohort check, one local training round, one held-out evaluation.

The rounds are :func:`common.segmentation.protocol.run_segmentation`'s. A train or evaluate request carries
the global weights (``w/<name>``), the round number, the proximal mu and the plan (JSON); the work is done by
:mod:`client.segmentation.task`, which holds the study's training settings to the site's policy and, with DP,
charges each round to the site's lifetime privacy ledger ``derived/privacy-ledger.json``
(:mod:`client.privacy_ledger`: every study and phase, at the site's ``max_delta``). The study's accountant state
(its fixed noise multiplier and history) is ``derived/segmentation/dp-state-<study hash>.json``, read before and
written after every round, so that both survive a SuperNode restart. Replies: the new weights, ``num-examples``
and the round's metrics (with the epsilon the study has spent at the site), or the held-out summary (aggregates
only).

Every step reads the study's imaging inputs (:mod:`client.steps.inputs`): with the preprocessing phase, the
site's preprocessed cases on the preprocessing plan's grid, which the segmentation plan's ``target_spacing`` must
equal (else the request is refused); without it, the raw cases.
"""

from __future__ import annotations

import json
from pathlib import Path

from client.steps.base import SiteStep, cases_with_masks, work_dir
from client.steps.inputs import check_plan_grid, load_imaging_inputs
from client.training.dp import read_ledger, write_ledger
from common.config import StudyConfig
from common.protocol import Payload, pack_weights, unpack_weights
from common.segmentation.protocol import COHORT, EVALUATE, PLAN_KEY, PROXIMAL_MU_KEY, ROUND_KEY, TRAIN
from common.sitedata import Site

PHASE = "segmentation"


def segmentation_dir(site: Site) -> Path:
    """The site's folder for the segmentation phase's local files (DP accountant state, overlays)."""
    path = work_dir(site) / "segmentation"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ledger_path(site: Site, study: StudyConfig) -> Path:
    """The site's DP accountant state of the study's segmentation training (its noise multiplier and history;
    what the site has spent is in its lifetime ledger, :func:`client.privacy_ledger.ledger_path`)."""
    return segmentation_dir(site) / f"dp-state-{study.hash[:16]}.json"


def _inputs(site: Site, study: StudyConfig, plan: dict | None = None) -> Site:
    """The site on the study's imaging inputs, the plan's grid checked against them."""
    inputs = load_imaging_inputs(site, study)
    if plan is not None:
        check_plan_grid(inputs, plan.get("target_spacing"))
    return inputs.site


def cohort_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Training and held-out case counts (refuses below ``min_cohort``)."""
    from client.segmentation.task import site_cohort

    return dict(site_cohort(_inputs(site, study), study))


def train_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """One local training round from the global weights; the new weights, ``num-examples`` and metrics."""
    from client.segmentation.task import train_round

    plan = json.loads(str(payload[PLAN_KEY]))
    dp_state = read_ledger(ledger_path(site, study)) if study.segmentation.dp.enabled else None
    out = train_round(_inputs(site, study, plan), study, plan, unpack_weights(payload), int(payload.get(ROUND_KEY, 0)),  # type: ignore[call-overload]
                      proximal_mu=float(payload.get(PROXIMAL_MU_KEY, 0.0)), dp_state=dp_state)  # type: ignore[arg-type]
    if out.dp_state is not None:
        write_ledger(ledger_path(site, study), out.dp_state)
    return {**pack_weights(out.weights), **{k: float(v) for k, v in out.metrics.items()}}


def evaluate_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """The site's held-out metric summary of the global weights (aggregates over >= ``min_cohort`` cases)."""
    from client.segmentation.task import evaluate_round

    plan = json.loads(str(payload[PLAN_KEY]))
    summary = evaluate_round(_inputs(site, study, plan), study, plan, unpack_weights(payload),
                             int(payload.get(ROUND_KEY, 0)))  # type: ignore[call-overload]
    return {k: float(v) for k, v in summary.items()}


STEPS: dict[str, SiteStep] = {
    COHORT: SiteStep(PHASE, cohort_step, cases_with_masks),
    TRAIN: SiteStep(PHASE, train_step, cases_with_masks),
    EVALUATE: SiteStep(PHASE, evaluate_step, cases_with_masks),
}
