"""The site's segmentation entry points, Flower-free: cohort check, one training round, one evaluation.

The site steps (:mod:`client.steps.segmentation`) call these functions with the server's payload; the
centralised baseline and the tests call them directly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.segmentation.data import PatchSampler, load_volume, split_cases
from client.segmentation.evaluation import evaluate_volumes
from client.segmentation.local import StepSettings, run_local_steps
from client.steps.base import work_dir
from client.training.device import pick_device, set_threads
from client.training.dp import check_training_policy, plan_round
from common.config import StudyConfig
from common.errors import PolicyError
from common.hashing import derive_seed
from common.release_ledger import SEGMENTATION_SPLIT
from common.segmentation.aggregation import update_norm
from common.segmentation.metrics import site_summary
from common.segmentation.networks import build_network, get_weights, set_weights
from common.segmentation.plan import NNUNET_TRAINER, local_trainer
from common.sitedata import Site

log = logging.getLogger(__name__)


def hold_to_ledger(site: Site, study: StudyConfig, scope: str, universe: list[str], held: list[str]) -> None:
    """The held-out cases a summary is over, held to the site's release ledger (rule ``release_ledger``): a
    server that changes the split between studies must change it by at least ``min_cell`` patients, or two
    summaries would difference into a few patients' values. Fixed by the study: not counted as a request."""
    from client.steps.base import release_ledger

    ledger = release_ledger(site)
    if ledger is not None:
        ledger.release(scope, universe, [held], study.hash, count=False)


def uses_nnunet_trainer(plan: Mapping[str, Any], study: StudyConfig, proximal_mu: float = 0.0) -> bool:
    """Whether nnU-Net's own trainer does the local steps (:func:`common.segmentation.plan.local_trainer`; a
    round that asks for a FedProx term runs fedbiopsy's loop, which has one)."""
    return local_trainer(plan, study) == NNUNET_TRAINER and proximal_mu <= 0


def site_cohort(site: Site, study: StudyConfig) -> dict[str, int]:
    """Training and held-out case counts; refuses (PolicyError) when either is below the site's ``min_cohort``."""
    cfg = study.segmentation
    train, held = split_cases(site.cases, cfg.holdout_fraction, cfg.seed)
    need = site.config.policy.min_cohort
    for what, cases in (("training", train), ("held-out", held)):
        if len(cases) < need:
            raise PolicyError(site.site_id, "min_cohort",
                              f"{len(cases)} {what} case(s) with masks (holdout_fraction "
                              f"{cfg.holdout_fraction:g}), policy needs at least {need}")
    return {"n_train": len(train), "n_heldout": len(held)}


@dataclass
class TrainOutcome:
    """A round's result at a site: new weights, metrics for the server, the DP state to keep."""

    weights: dict[str, np.ndarray]
    metrics: dict[str, float]
    dp_state: dict | None = field(default=None)


def train_round(site: Site, study: StudyConfig, plan: Mapping[str, Any], global_weights: Mapping[str, np.ndarray],
                server_round: int, proximal_mu: float = 0.0, dp_state: dict | None = None,
                device: Any = None) -> TrainOutcome:
    """Load the global weights, run the round's local steps on the training cases, return the new weights.

    Before any data is loaded the study's settings are held to the site's policy
    (:func:`client.training.dp.check_training_policy`: DP required, distinct patients per step from the plan's
    ``batch_size``, DP delta) and, with DP, the round is reserved in the site's lifetime privacy ledger
    (:mod:`client.privacy_ledger`, refused past ``max_epsilon`` at the site's ``max_delta``); it is charged only
    when the local steps succeed. ``dp_state`` fixes the noise multiplier of the study across rounds.
    """
    import torch

    from client.privacy_ledger import Mechanism, SiteBudget

    cfg = study.segmentation
    policy = site.config.policy
    set_threads(cfg.threads)
    counts = site_cohort(site, study)
    train_cases, _ = split_cases(site.cases, cfg.holdout_fraction, cfg.seed)
    batch = int(plan["batch_size"])  # what the local steps use (the server's plan)
    check_training_policy(site.site_id, policy, cfg.dp, batch_size=batch, n_train=counts["n_train"],
                          what="segmentation training")
    dp = None
    budget = SiteBudget(site.site_id, site.root, policy, study.hash, "segmentation", cfg.network, cfg.dp.accountant)
    reservation: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if cfg.dp.enabled:
        dp = plan_round(site.site_id, dp_state, study.hash, target_epsilon=cfg.dp.target_epsilon,
                        delta=policy.max_delta, noise_delta=cfg.dp.delta, max_grad_norm=cfg.dp.max_grad_norm,
                        accountant=cfg.dp.accountant, noise_multiplier=cfg.dp.noise_multiplier,
                        n_train=counts["n_train"], batch_size=batch, total_steps=cfg.rounds * cfg.local_steps,
                        round_steps=cfg.local_steps, max_epsilon=policy.max_epsilon)
        reservation = budget.reserve(Mechanism(dp.noise_multiplier, dp.sample_rate, cfg.local_steps), server_round)
    t0 = time.perf_counter()
    with reservation:  # refuses here, before any data is read, when the round would pass the site's budget
        device = device or pick_device()
        seed = derive_seed(cfg.seed, site.site_id, server_round)
        volumes = [load_volume(c, plan["sequences"]) for c in train_cases]
        if uses_nnunet_trainer(plan, study, proximal_mu):
            from client.segmentation.nnunet_trainer import TrainerSettings, train_with_nnunet

            weights, stats = train_with_nnunet(volumes, plan, global_weights,
                                               TrainerSettings.for_round(cfg, max(0, server_round - 1), seed),
                                               device, work_dir(site) / "segmentation", site.site_id)
        else:
            sampler = PatchSampler(volumes, plan["patch_size"], cfg.foreground_ratio, cfg.augment, seed)
            net = build_network(plan)
            set_weights(net, global_weights, site.site_id)
            anchors = ({k: torch.from_numpy(np.asarray(v)) for k, v in global_weights.items()}
                       if proximal_mu > 0 else None)
            settings = StepSettings(steps=cfg.local_steps, batch_size=batch, num_classes=int(plan["num_classes"]),
                                    optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, amp=cfg.amp,
                                    proximal_mu=proximal_mu, seed=seed, schedule=cfg.lr_schedule,
                                    step_offset=max(0, server_round - 1) * cfg.local_steps,
                                    total_steps=cfg.rounds * cfg.local_steps)
            stats = run_local_steps(net, sampler, settings, device, global_params=anchors, dp=dp)
            weights = get_weights(net)
    metrics: dict[str, float] = {
        "num-examples": counts["n_train"], **stats, "seconds": time.perf_counter() - t0,
        "update-norm": update_norm(weights, global_weights),
        "dp": 1.0 if dp is not None else 0.0,
        "epsilon": budget.study_epsilon() if dp is not None else 0.0,  # the study's, at the site's delta
        "delta": policy.max_delta if dp is not None else 0.0,
        "noise-multiplier": dp.noise_multiplier if dp is not None else 0.0,
    }
    log.info("site %s round %d: loss %.4f in %.1fs%s", site.site_id, server_round, stats["train-loss"],
             metrics["seconds"], f", epsilon {metrics['epsilon']:.3f} (site lifetime "
             f"{budget.lifetime_epsilon():.3f} of {policy.max_epsilon:g})" if dp is not None else "")
    return TrainOutcome(weights, metrics, dp.state(study.hash) if dp is not None else dp_state)


def evaluate_round(site: Site, study: StudyConfig, plan: Mapping[str, Any], weights: Mapping[str, np.ndarray],
                   server_round: int, device: Any = None, overlay_dir: Path | None = None) -> dict[str, float]:
    """The site's metric summary of ``weights`` on its held-out cases (aggregates over >= min_cohort cases).

    PNG overlays of the first ``segmentation.overlays`` cases go to the site's own ``derived/`` folder (the
    latest round overwrites), never into the reply.
    """
    cfg = study.segmentation
    set_threads(cfg.threads)
    site_cohort(site, study)
    _, held = split_cases(site.cases, cfg.holdout_fraction, cfg.seed)
    hold_to_ledger(site, study, SEGMENTATION_SPLIT, [c.patient_id for c in site.cases if c.mask is not None],
                   [c.patient_id for c in held])
    device = device or pick_device()
    net = build_network(plan)
    set_weights(net, weights, site.site_id)
    volumes = [load_volume(c, plan["sequences"]) for c in held]
    if overlay_dir is None and cfg.overlays:
        overlay_dir = work_dir(site) / "segmentation" / f"overlays-{study.hash[:12]}"
    results = evaluate_volumes(net, volumes, plan["patch_size"], device, overlap=cfg.sw_overlap, amp=cfg.amp,
                               mirror=cfg.mirror, largest_only=cfg.keep_largest,
                               overlay_dir=overlay_dir, overlays=cfg.overlays, plan=plan,
                               fill_holes=cfg.fill_holes)
    policy = site.config.policy
    summary = site_summary(site.site_id, [r.metrics for r in results], policy.min_cohort, policy.cell_floor)
    log.info("site %s round %d: held-out DSC median %.3f over %d case(s)", site.site_id, server_round,
             summary["dsc-median"], len(results))
    return summary
