"""The site half of the classifier protocol over arrays (Flower-free): one training round, and one evaluation
that returns aggregates only. The Flower site steps (:mod:`client.steps.classifier`) and the in-memory sites
(:mod:`client.classifier.memory`) both call :func:`train_reply` and :func:`evaluate_reply`.

Feature inputs arrive raw and are standardised here by the pooled mean and SD the server sends; crops are the
image model's inputs. Replies hold weights, counts, histograms and per-feature sums -- never a case.
"""

from __future__ import annotations

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
from client.training.device import set_threads
from client.training.dp import plan_round
from common.classifier.explain import site_shap_summary
from common.classifier.metrics import site_evaluation
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
               dp_state: dict | None = None, study_hash: str = "", lr: float | None = None) -> TrainResult:
    """Load the global weights, run the round's local steps on the site's training cases, return the new weights.

    With DP, ``dp_state`` is the site's privacy ledger for the study, shared by every model trained on the same
    patients: its history composes all of them, so ``epsilon`` is the site's total and ``max_epsilon`` (the
    site's policy) bounds the total, not each model.
    """
    set_threads(cfg.threads)
    n = len(y)
    if n < min_cohort:
        raise PolicyError(site_id, "min_cohort", f"{n} training case(s) for the classifier, policy needs {min_cohort}")
    seed = derive_seed(cfg.seed, site_id, server_round, kind)
    settings = local_settings(kind, cfg, seed, lr)
    dp = None
    if cfg.dp.enabled:
        rounds = rounds_of(kind, cfg)
        dp = plan_round(site_id, dp_state, study_hash, target_epsilon=cfg.dp.target_epsilon,
                        delta=cfg.dp.delta, max_grad_norm=cfg.dp.max_grad_norm, accountant=cfg.dp.accountant,
                        noise_multiplier=cfg.dp.noise_multiplier, n_train=n, batch_size=int(settings.batch_size or n),
                        total_steps=rounds * settings.steps, round_steps=settings.steps, max_epsilon=max_epsilon)
    net = build_model(kind, x.shape[1] if kind != "image" else 0, cfg, n_channels=x.shape[1])
    load_weights(net, weights, site_id)
    if kind == "image":
        stats = run_local_steps(net, crop_batches(x, y), ce_loss(), settings, dp)
    else:
        stats = run_local_steps(net, feature_batches(x, y), bce_loss(), settings, dp)
    metrics: dict[str, float] = {
        "num-examples": float(n), **stats,
        "dp": 1.0 if dp is not None else 0.0,
        "epsilon": dp.epsilon if dp is not None else 0.0,
        "delta": dp.delta if dp is not None else 0.0,
        "noise-multiplier": dp.noise_multiplier if dp is not None else 0.0,
    }
    return TrainResult(model_weights(net), metrics, dp.state(study_hash) if dp is not None else dp_state)


def _prefixed(prefix: str, payload: Mapping[str, object]) -> Payload:
    return {f"{prefix}{k}": v for k, v in payload.items()}


def site_evaluate(site_id: str, kind: str, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                  cfg: ClassifierConfig, *, min_cohort: int, strata: Mapping[str, Sequence[str]] | None = None,
                  masks: np.ndarray | None = None, overlay_dir: Path | None = None,
                  case_ids: Sequence[str] | None = None) -> Payload:
    """The site's evaluation aggregates of the global model on its held-out cases.

    ``strata[attribute]`` gives each held-out case's level (e.g. sex); levels with fewer than ``min_cohort``
    cases are not evaluated (named in ``suppressed``). Feature models add per-feature SHAP sums; the image model
    adds Grad-CAM statistics (``masks`` are the crops' tumour masks) and writes overlays into ``overlay_dir``.
    """
    set_threads(cfg.threads)
    seed = derive_seed(cfg.seed, site_id, "bootstrap", kind)
    net = build_model(kind, x.shape[1] if kind != "image" else 0, cfg, n_channels=x.shape[1])
    load_weights(net, weights, site_id)
    scores = image_scores(net, x) if kind == "image" else feature_scores(net, x)
    reply = site_evaluation(site_id, scores, y, bins=cfg.score_bins, n_boot=cfg.bootstrap, seed=seed,
                            min_cohort=min_cohort)
    suppressed: list[str] = []
    for attr, levels in (strata or {}).items():
        lv = np.asarray([str(v) for v in levels])
        for level in sorted(set(lv.tolist())):
            sel = lv == level
            if sel.sum() < min_cohort:
                suppressed.append(f"{attr}={level}")
                continue
            part = site_evaluation(site_id, scores[sel], np.asarray(y)[sel], bins=cfg.score_bins,
                                   n_boot=cfg.bootstrap, seed=derive_seed(seed, attr, level), min_cohort=min_cohort)
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
                study_hash: str = "") -> tuple[Payload, dict | None]:
    """A ``train.classifier`` reply (new weights, case count, DP figures) and the site's DP ledger after it."""
    lr = payload.get("lr")
    res = site_train(site_id, str(payload["model"]), unpack_weights(payload), model_inputs(site_id, payload, x), y,
                     cfg, server_round=int(payload.get("round", 0)),  # type: ignore[call-overload]
                     min_cohort=min_cohort, max_epsilon=max_epsilon, dp_state=dp_state, study_hash=study_hash,
                     lr=float(lr) if lr else None)  # type: ignore[arg-type]
    reply = pack_weights(res.weights)
    reply.update(res.metrics)
    return reply, res.dp_state


def evaluate_reply(site_id: str, payload: Mapping[str, object], x: np.ndarray, y: np.ndarray,
                   cfg: ClassifierConfig, *, min_cohort: int, strata: Mapping[str, Sequence[str]] | None = None,
                   masks: np.ndarray | None = None, overlay_dir: Path | None = None,
                   case_ids: Sequence[str] | None = None) -> Payload:
    """An ``evaluate.classifier`` reply: the held-out aggregates of the payload's model (:func:`site_evaluate`)."""
    return site_evaluate(site_id, str(payload["model"]), unpack_weights(payload), model_inputs(site_id, payload, x),
                         y, cfg, min_cohort=min_cohort, strata=strata, masks=masks, overlay_dir=overlay_dir,
                         case_ids=case_ids)
