"""The classifier protocol in one process: the same site and server functions the Flower phase runs.

>>> run = federated_classifier(site_arrays, "logistic", study.classifier)        # doctest: +SKIP
>>> run.summary["pooled"]["auc"], run.summary["per_site"]["site-001"]["auc_lo"]   # doctest: +SKIP

``site_arrays`` holds each site's training and held-out arrays (:class:`SiteArrays`, built from feature tables
by :func:`feature_site_arrays`); features are standardised by the pooled moments of the training features,
computed from the sites' moments exactly as in the Flower phase.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from client.training.classifier_data import stratified_split
from client.training.classifier_models import build_model, model_weights
from client.training.classifier_site import rounds_of, site_evaluate, site_train
from common.classification.evaluation import summarise_evaluation
from common.classification.training import (
    fedavg_round,
    pooled_correlation,
    scaling,
    site_crossproduct,
    standardise,
    step_size,
)
from common.config import ClassifierConfig
from common.pooled_moments import merge_moments, site_moments

log = logging.getLogger(__name__)


@dataclass
class SiteArrays:
    """One site's classifier inputs (they stay at the site in a real federation)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_ids: list[str] = field(default_factory=list)
    strata: dict[str, list[str]] = field(default_factory=dict)  # attribute -> level of each held-out case
    attributes: dict[str, str] = field(default_factory=dict)  # vendor, field_strength
    masks_test: np.ndarray | None = None  # image model: tumour masks of the held-out crops


@dataclass
class ClassifierRun:
    """The outcome of one federated training and evaluation."""

    kind: str
    weights: dict[str, np.ndarray]
    summary: dict
    mean: np.ndarray | None
    scale: np.ndarray | None
    history: list[dict[str, np.ndarray]]
    train_metrics: dict[str, dict[str, float]]


def feature_site_arrays(features: Mapping[str, pd.DataFrame], labels: Mapping[str, pd.Series], cfg: ClassifierConfig,
                        clinical: Mapping[str, pd.DataFrame] | None = None,
                        attributes: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, SiteArrays]:
    """Each site's split of its feature table (rows: patient_id) by the study's deterministic split."""
    out = {}
    for site, frame in features.items():
        y = labels[site].loc[frame.index].astype(int)
        train, test = stratified_split(list(frame.index), list(y.values), cfg.holdout_fraction, cfg.seed)
        strata = {}
        if clinical is not None:
            for attr in cfg.fairness_attributes:
                if attr in clinical[site].columns:
                    strata[attr] = [str(v) for v in clinical[site].loc[test, attr]]
        out[site] = SiteArrays(frame.loc[train].to_numpy(np.float64), y.loc[train].to_numpy(),
                               frame.loc[test].to_numpy(np.float64), y.loc[test].to_numpy(), list(test), strata,
                               dict((attributes or {}).get(site, {})))
    return out


def federated_classifier(sites: Mapping[str, SiteArrays], kind: str, cfg: ClassifierConfig, *, min_cohort: int = 5,
                         feature_names: Sequence[str] | None = None, keep_history: bool = False,
                         overlay_dir: Path | None = None) -> ClassifierRun:
    """Train ``kind`` by FedAvg over ``sites`` and evaluate it there; every exchange is an aggregate."""
    mean = scale = None
    lr: float | None = None
    inputs = {s: (a.x_train, a.x_test) for s, a in sites.items()}
    if kind != "image":
        replies = {s: {**site_moments(s, a.x_train, min_cohort), "cross": site_crossproduct(a.x_train)}
                   for s, a in sites.items()}
        moments = merge_moments(replies)
        mean, scale = scaling(moments)
        lr = step_size(pooled_correlation(replies, moments), cfg.l2, cfg.lr) if cfg.auto_lr else cfg.lr
        inputs = {s: (standardise(a.x_train, mean, scale), standardise(a.x_test, mean, scale))
                  for s, a in sites.items()}
    first = next(iter(sites.values()))
    weights = model_weights(build_model(kind, first.x_train.shape[1], cfg, n_channels=first.x_train.shape[1]))
    history = [weights] if keep_history else []
    train_metrics: dict[str, dict[str, float]] = {}
    dp_states: dict[str, dict | None] = dict.fromkeys(sites)
    for rnd in range(1, rounds_of(kind, cfg) + 1):
        updates = {}
        for s, a in sites.items():
            res = site_train(s, kind, weights, inputs[s][0], a.y_train, cfg, server_round=rnd, min_cohort=min_cohort,
                             dp_state=dp_states[s], study_hash="inprocess", lr=lr)
            dp_states[s] = res.dp_state
            train_metrics[s] = res.metrics
            updates[s] = (res.weights, res.metrics["num-examples"])
        weights, _ = fedavg_round(weights, updates, cfg.max_update_norm, minimum=1)
        if keep_history:
            history.append(weights)
    replies = {}
    for s, a in sites.items():
        replies[s] = site_evaluate(s, kind, weights, inputs[s][1], a.y_test, cfg, min_cohort=min_cohort,
                                   strata=a.strata, masks=a.masks_test, case_ids=a.test_ids,
                                   overlay_dir=(overlay_dir / s) if overlay_dir is not None else None)
    summary = summarise_evaluation(replies, {s: a.attributes for s, a in sites.items()}, bins=cfg.score_bins,
                                   calibration_bins=cfg.calibration_bins, feature_names=feature_names)
    summary["epsilon"] = {s: m.get("epsilon", 0.0) for s, m in train_metrics.items()}
    summary["lr"] = lr
    return ClassifierRun(kind, weights, summary, mean, scale, history, train_metrics)
