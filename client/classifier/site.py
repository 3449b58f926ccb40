"""The site half of the classifier protocol over arrays (Flower-free): one training round, and one evaluation
that returns aggregates only. The Flower site steps (:mod:`client.steps.classifier`) and the in-memory sites
(:mod:`client.classifier.memory`) both call :func:`train_reply` and :func:`evaluate_reply`.

Feature inputs arrive raw and are standardised here by the pooled mean and SD the server sends; crops are the
image model's inputs. Replies hold weights, counts, histograms and per-feature sums -- never a case.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.classifier.local import (
    LocalSettings,
    bce_loss,
    ce_loss,
    crop_batches,
    feature_batches,
    run_local_steps,
)
from client.privacy_ledger import Mechanism, SiteBudget
from client.training.device import set_threads
from client.training.dp import check_training_policy, plan_round
from common.classifier.explain import site_shap_summary
from common.classifier.fairness import released_levels
from common.classifier.metrics import bin_index, check_score_bins, release_segments, site_evaluation
from common.classifier.models import (
    build_model,
    feature_scores,
    image_scores,
    load_weights,
    model_weights,
    rounds_of,
)
from common.classifier.training import standardise
from common.config import ClassifierConfig
from common.errors import PolicyError, ProtocolError
from common.hashing import derive_seed
from common.protocol import Payload, pack_weights, unpack_weights
from common.sitedata import SitePolicy

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """A site's round: new weights, metrics for the server, the DP ledger to keep at the site."""

    weights: dict[str, np.ndarray]
    metrics: dict[str, float]
    dp_state: dict | None = field(default=None)


def local_settings(kind: str, cfg: ClassifierConfig, seed: int, lr: float | None = None) -> LocalSettings:
    """The local schedule of a model kind (DP forces batches of ``dp.batch_size`` distinct patients);
    ``lr`` (the server's step size for feature models) replaces ``cfg.lr``."""
    if kind == "image":
        return LocalSettings(steps=cfg.image_local_steps, lr=cfg.image_lr, l2=0.0, batch_size=cfg.image_batch_size,
                             optimizer="adam", seed=seed)
    return LocalSettings(steps=cfg.local_steps, lr=lr or cfg.lr, l2=cfg.l2,
                         batch_size=cfg.dp.batch_size if cfg.dp.enabled else None, optimizer="sgd", seed=seed)


def site_train(site_id: str, kind: str, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray,
               cfg: ClassifierConfig, *, server_round: int, min_cohort: int, max_epsilon: float = float("inf"),
               dp_state: dict | None = None, study_hash: str = "", lr: float | None = None,
               budget: SiteBudget | None = None) -> TrainResult:
    """Load the global weights, run the round's local steps on the site's training cases, return the new weights.

    At a real site ``budget`` is its lifetime privacy ledger (:class:`client.privacy_ledger.SiteBudget`): the
    training settings are held to its policy (DP required, distinct patients per step, DP delta), the round is
    reserved before it runs and charged when it succeeds, ``epsilon`` is what the study has spent at the site and
    every epsilon is counted at the policy's ``max_delta``; ``max_epsilon`` is then the policy's. ``dp_state`` is
    the accountant state that fixes the noise multiplier across rounds. Without ``budget`` (in-memory sites),
    ``dp_state`` is also the ledger: its history composes every model trained on the same patients, so
    ``epsilon`` is the site's total and ``max_epsilon`` bounds the total, at the study's delta.
    """
    set_threads(cfg.threads)
    n = len(y)
    if n < min_cohort:
        raise PolicyError(site_id, "min_cohort", f"{n} training case(s) for the classifier, policy needs {min_cohort}")
    seed = derive_seed(cfg.seed, site_id, server_round, kind)
    settings = local_settings(kind, cfg, seed, lr)
    delta = cfg.dp.delta
    if budget is not None:
        check_training_policy(site_id, budget.policy, cfg.dp, batch_size=settings.batch_size, n_train=n,
                              what=f"classifier training ({kind})")
        delta, max_epsilon = budget.policy.max_delta, budget.policy.max_epsilon
    dp = None
    reservation: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if cfg.dp.enabled:
        rounds = rounds_of(kind, cfg)
        dp = plan_round(site_id, dp_state, study_hash, target_epsilon=cfg.dp.target_epsilon,
                        delta=delta, noise_delta=cfg.dp.delta, max_grad_norm=cfg.dp.max_grad_norm,
                        accountant=cfg.dp.accountant, noise_multiplier=cfg.dp.noise_multiplier, n_train=n,
                        batch_size=int(settings.batch_size or n), total_steps=rounds * settings.steps,
                        round_steps=settings.steps, max_epsilon=max_epsilon)
        if budget is not None:
            reservation = budget.reserve(Mechanism(dp.noise_multiplier, dp.sample_rate, settings.steps), server_round)
    with reservation:  # refused here, before the local steps, past the site's lifetime budget
        net = build_model(kind, x.shape[1] if kind != "image" else 0, cfg, n_channels=x.shape[1])
        load_weights(net, weights, site_id)
        if kind == "image":
            stats = run_local_steps(net, crop_batches(x, y), ce_loss(), settings, dp)
        else:
            stats = run_local_steps(net, feature_batches(x, y), bce_loss(), settings, dp)
    epsilon = 0.0
    if dp is not None:
        epsilon = budget.study_epsilon() if budget is not None else dp.epsilon
    metrics: dict[str, float] = {
        "num-examples": float(n), **stats,
        "dp": 1.0 if dp is not None else 0.0,
        "epsilon": epsilon,
        "delta": delta if dp is not None else 0.0,
        "noise-multiplier": dp.noise_multiplier if dp is not None else 0.0,
    }
    return TrainResult(model_weights(net), metrics, dp.state(study_hash) if dp is not None else dp_state)


def _prefixed(prefix: str, payload: Mapping[str, object]) -> Payload:
    return {f"{prefix}{k}": v for k, v in payload.items()}


def _evaluation_seed(seed: int, policy: SitePolicy, x: np.ndarray, y: np.ndarray) -> int:
    """The bootstrap seed: the study's (reproducible, as before) where the policy allows exact outcomes; else
    keyed by the held-out data too, so that the server (which knows the study seed and the site id) cannot
    replay the draws and solve the replicates for single cases."""
    if policy.cell_floor <= 1:
        return seed
    # float32: the same inputs scaled by the server's pooled mean and SD in another summation order (in memory
    # or through Flower) differ in the last float64 bits only
    data = np.ascontiguousarray(x, dtype=np.float32).tobytes() + np.ascontiguousarray(y, dtype=np.int64).tobytes()
    digest = hashlib.sha256(data).hexdigest()
    return derive_seed(seed, digest)


def site_evaluate(site_id: str, kind: str, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                  cfg: ClassifierConfig, *, min_cohort: int, strata: Mapping[str, Sequence[str]] | None = None,
                  masks: np.ndarray | None = None, overlay_dir: Path | None = None,
                  case_ids: Sequence[str] | None = None, policy: SitePolicy | None = None) -> Payload:
    """The site's evaluation aggregates of the global model on its held-out cases.

    ``strata[attribute]`` gives each held-out case's level (e.g. sex); levels with fewer than ``min_cohort``
    cases are not evaluated (named in ``suppressed``). Feature models add per-feature SHAP sums; the image model
    adds Grad-CAM statistics (``masks`` are the crops' tumour masks) and writes overlays into ``overlay_dir``.

    ``policy`` (default: the default policy at ``min_cohort``) bounds the reply: at most ``histogram_bins`` score
    bins, and unless it allows exact outcomes, score cells of at least ``cell_floor`` cases shared by the cohort
    and every stratum, whose complement is withheld when small (:mod:`common.classifier.metrics`,
    :func:`common.classifier.fairness.released_levels`).
    """
    pol = policy if policy is not None else SitePolicy(min_cohort=min_cohort)
    floor = pol.cell_floor
    check_score_bins(site_id, cfg.score_bins, pol.histogram_bins)
    set_threads(cfg.threads)
    net = build_model(kind, x.shape[1] if kind != "image" else 0, cfg, n_channels=x.shape[1])
    load_weights(net, weights, site_id)
    scores = image_scores(net, x) if kind == "image" else feature_scores(net, x)
    seed = _evaluation_seed(derive_seed(cfg.seed, site_id, "bootstrap", kind), pol, x, np.asarray(y))
    y_arr = np.asarray(y)
    parts = {attr: released_levels(levels, min_cohort, floor) for attr, levels in (strata or {}).items()}
    segments = None
    if floor > 1 and np.asarray(scores).size >= max(min_cohort, floor) and np.all(np.isfinite(scores)):
        idx = bin_index(scores, cfg.score_bins)
        partitions = [np.zeros(idx.size, dtype=np.int64), *(part for _, _, part in parts.values())]
        segments = release_segments(idx, cfg.score_bins, partitions, floor)
    reply = site_evaluation(site_id, scores, y_arr, bins=cfg.score_bins, n_boot=cfg.bootstrap, seed=seed,
                            min_cohort=min_cohort, cell_floor=floor, segments=segments)
    suppressed: list[str] = []
    for attr, (released, small, _) in parts.items():
        lv = np.asarray([str(v) for v in (strata or {})[attr]])
        suppressed.extend(f"{attr}={level}" for level in small)
        for level in released:
            sel = lv == level
            part = site_evaluation(site_id, scores[sel], y_arr[sel], bins=cfg.score_bins, n_boot=cfg.bootstrap,
                                   seed=derive_seed(seed, attr, level), min_cohort=min_cohort, cell_floor=floor,
                                   segments=segments)
            reply.update(_prefixed(f"stratum/{attr}/{level}/", part))
    reply["suppressed"] = suppressed
    if kind in ("logistic", "mlp") and cfg.shap:
        from client.classifier.explain import shap_values

        values, base, _ = shap_values(kind, net, x, np.zeros((1, x.shape[1])), cfg.shap_nsamples, seed)
        reply.update(site_shap_summary(site_id, values, min_cohort))
        reply["shap_base"] = base
    if kind == "image" and masks is not None:
        reply.update(_gradcam_summary(net, x, masks, cfg, overlay_dir, case_ids, scores))
    return reply


def _gradcam_summary(net: Any, crops: np.ndarray, masks: np.ndarray, cfg: ClassifierConfig,
                     overlay_dir: Path | None, case_ids: Sequence[str] | None, scores: np.ndarray) -> Payload:
    from client.classifier.explain import cam_in_tumour, grad_cam, save_gradcam_overlay

    maps = grad_cam(net, crops, cfg.gradcam_layer)
    stats = cam_in_tumour(maps, masks)
    if overlay_dir is not None:
        for i in range(min(cfg.gradcam_overlays, len(crops))):
            name = case_ids[i] if case_ids is not None else f"case-{i}"
            save_gradcam_overlay(crops[i], masks[i], maps[i], Path(overlay_dir) / f"{name}.png",
                                 title=f"{name}: p(subtype 1) = {scores[i]:.2f}")
    return {"gradcam_n": int(len(crops)), "gradcam_peak_sum": float(stats["peak_in_tumour"].sum()),
            "gradcam_mass_sum": float(stats["mass_in_tumour"].sum()),
            "gradcam_chance_sum": float(stats["tumour_share"].sum())}


def model_inputs(site_id: str, payload: Mapping[str, object], x: np.ndarray) -> np.ndarray:
    """The model's inputs: crops as they are; features (columns in the server's order) standardised by the
    pooled mean and SD of the payload."""
    if str(payload["model"]) == "image":
        return x
    mean, scale = np.asarray(payload["x_mean"]), np.asarray(payload["x_scale"])
    if mean.shape != (x.shape[1],) or scale.shape != (x.shape[1],):
        raise ProtocolError(site_id, f"the pooled scaling has {mean.size} feature(s), the site {x.shape[1]}",
                            "use the same feature table layout at every site")
    return standardise(x, mean, scale)


def train_reply(site_id: str, payload: Mapping[str, object], x: np.ndarray, y: np.ndarray, cfg: ClassifierConfig,
                *, min_cohort: int, max_epsilon: float = float("inf"), dp_state: dict | None = None,
                study_hash: str = "", budget: SiteBudget | None = None) -> tuple[Payload, dict | None]:
    """A ``train.classifier`` reply (new weights, case count, DP figures) and the site's DP state after it
    (``budget``: the site's lifetime privacy ledger, see :func:`site_train`)."""
    lr = payload.get("lr")
    res = site_train(site_id, str(payload["model"]), unpack_weights(payload), model_inputs(site_id, payload, x), y,
                     cfg, server_round=int(payload.get("round", 0)),  # type: ignore[call-overload]
                     min_cohort=min_cohort, max_epsilon=max_epsilon, dp_state=dp_state, study_hash=study_hash,
                     lr=float(lr) if lr else None, budget=budget)  # type: ignore[arg-type]
    reply = pack_weights(res.weights)
    reply.update(res.metrics)
    return reply, res.dp_state


def evaluate_reply(site_id: str, payload: Mapping[str, object], x: np.ndarray, y: np.ndarray,
                   cfg: ClassifierConfig, *, min_cohort: int, strata: Mapping[str, Sequence[str]] | None = None,
                   masks: np.ndarray | None = None, overlay_dir: Path | None = None,
                   case_ids: Sequence[str] | None = None, policy: SitePolicy | None = None) -> Payload:
    """An ``evaluate.classifier`` reply: the held-out aggregates of the payload's model (:func:`site_evaluate`),
    bounded by the site's ``policy``."""
    return site_evaluate(site_id, str(payload["model"]), unpack_weights(payload), model_inputs(site_id, payload, x),
                         y, cfg, min_cohort=min_cohort, strata=strata, masks=masks, overlay_dir=overlay_dir,
                         case_ids=case_ids, policy=policy)
