"""Simulation only: the centralised baseline of the segmentation phase, and the federated-minus-centralised gap.

In a simulation every site's folder is on this machine, so the cases can be pooled -- which a real federation
never does. The baseline trains the same plan's network on the pooled training cases (each site's own split)
with the same budget: the same number of training patches and of sequential optimizer steps as the federation
(``rounds x local steps`` steps of ``sites x batch`` patches, where each round the sites took ``local steps`` steps
of ``batch`` patches each, in parallel), the same optimiser, learning rate and schedule. Both models are then
scored per case on the same held-out cases, so the pooled median DSC here is exact (the federation only sees
per-site aggregates).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.segmentation.data import PatchSampler, Volume, load_volume, split_cases
from client.segmentation.evaluation import evaluate_volumes
from client.segmentation.local import StepSettings, run_local_steps
from client.segmentation.task import uses_nnunet_trainer
from client.training.device import pick_device
from common.config import StudyConfig
from common.hashing import derive_seed
from common.segmentation.metrics import summarise_cases
from common.segmentation.networks import build_network, get_weights, set_weights
from common.validation import load_site

log = logging.getLogger(__name__)


def pooled_volumes(site_dirs: Sequence[Path], study: StudyConfig, sequences: Sequence[str]
                   ) -> tuple[list[Volume], dict[str, list[Volume]]]:
    """(training volumes of all sites, held-out volumes by site), each site split as it splits itself, on the
    study's imaging inputs (the preprocessed cases when the study preprocesses; :mod:`client.steps.inputs`)."""
    from client.steps.inputs import imaging_site

    cfg = study.segmentation
    train: list[Volume] = []
    held: dict[str, list[Volume]] = {}
    for d in site_dirs:
        site = imaging_site(load_site(d), study)
        tr, ho = split_cases(site.cases, cfg.holdout_fraction, cfg.seed)
        train += [load_volume(c, sequences) for c in tr]
        held[site.site_id] = [load_volume(c, sequences) for c in ho]
    return train, held


def score(plan: Mapping[str, Any], weights: Mapping[str, np.ndarray], held: Mapping[str, Sequence[Volume]],
          study: StudyConfig, overlay_dir: Path | None = None, overlays_per_site: int = 0,
          device: Any = None) -> dict:
    """Per-case metrics of ``weights`` on the held-out volumes: per site and pooled summaries, per-case DSC."""
    device = device or pick_device()
    net = build_network(plan)
    set_weights(net, weights)
    per_site, all_cases, per_case = {}, [], {}
    for site_id, vols in held.items():
        res = evaluate_volumes(net, vols, plan["patch_size"], device, overlap=study.segmentation.sw_overlap,
                               mirror=study.segmentation.mirror, largest_only=study.segmentation.keep_largest,
                               overlay_dir=overlay_dir / site_id if overlay_dir else None,
                               overlays=overlays_per_site, plan=plan, fill_holes=study.segmentation.fill_holes)
        per_site[site_id] = summarise_cases([r.metrics for r in res])
        all_cases += [r.metrics for r in res]
        per_case.update({f"{site_id}/{r.patient_id}": r.metrics["dsc"] for r in res})
    return {"sites": per_site, "pooled": summarise_cases(all_cases), "dsc_per_case": per_case}


def train_centralised(plan: Mapping[str, Any], study: StudyConfig, train: Sequence[Volume], n_sites: int,
                      device: Any = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The plan's network trained on the pooled cases: ``rounds x local_steps`` steps of ``n_sites x batch``."""
    cfg = study.segmentation
    device = device or pick_device()
    net = build_network(plan, seed=derive_seed(cfg.seed, "initial-model"))
    steps = cfg.rounds * cfg.local_steps
    if uses_nnunet_trainer(plan, study):  # nnU-Net's trainer, one epoch per round, on the pooled cases
        from client.segmentation.nnunet_trainer import TrainerSettings, train_with_nnunet

        pooled_plan = {**plan, "batch_size": n_sites * int(plan["batch_size"])}
        weights, t0, losses = get_weights(net), time.perf_counter(), []
        with tempfile.TemporaryDirectory(prefix="centralised-") as tmp:
            for r in range(cfg.rounds):
                epoch = TrainerSettings.for_round(cfg, r, derive_seed(cfg.seed, "centralised-steps", r))
                weights, st = train_with_nnunet(train, pooled_plan, weights, epoch, device, Path(tmp))
                losses.append(st["train-loss"])
        return weights, {"train-loss": float(np.mean(losses)), "steps": float(steps),
                         "seconds": time.perf_counter() - t0}
    sampler = PatchSampler(train, plan["patch_size"], cfg.foreground_ratio, cfg.augment,
                           derive_seed(cfg.seed, "centralised"))
    settings = StepSettings(steps=steps, batch_size=n_sites * int(plan["batch_size"]),
                            num_classes=int(plan["num_classes"]), optimizer=cfg.optimizer, lr=cfg.lr,
                            weight_decay=cfg.weight_decay, amp=cfg.amp,
                            seed=derive_seed(cfg.seed, "centralised-steps"), schedule=cfg.lr_schedule)
    t0 = time.perf_counter()
    stats = run_local_steps(net, sampler, settings, device)
    stats["seconds"] = time.perf_counter() - t0
    return get_weights(net), stats


def compare_with_centralised(plan: Mapping[str, Any], federated: Mapping[str, np.ndarray], study: StudyConfig,
                             site_dirs: Sequence[Path], out_dir: Path | None = None, overlays_per_site: int = 1
                             ) -> dict:
    """Federated vs centralised on the same held-out cases: summaries, the DSC gap, overlays (PNG) when asked."""
    train, held = pooled_volumes(site_dirs, study, plan["sequences"])
    fed = score(plan, federated, held, study, out_dir / "overlays-federated" if out_dir else None, overlays_per_site)
    central_weights, stats = train_centralised(plan, study, train, len(site_dirs))
    cen = score(plan, central_weights, held, study, out_dir / "overlays-centralised" if out_dir else None,
                overlays_per_site)
    gap = fed["pooled"]["dsc"]["median"] - cen["pooled"]["dsc"]["median"]
    log.info("federated DSC median %.4f, centralised %.4f, gap %+.4f", fed["pooled"]["dsc"]["median"],
             cen["pooled"]["dsc"]["median"], gap)
    return {"federated": fed, "centralised": cen, "centralised_training": stats,
            "dsc_gap_federated_minus_centralised": gap, "n_train": len(train),
            "n_heldout": sum(len(v) for v in held.values())}
