"""In-memory classifier sites: the site half of the protocol over arrays held in this process.

>>> sites = memory_sites(feature_site_arrays(tables, labels, cfg), cfg)               # doctest: +SKIP
>>> run = run_classifier(InMemoryQuery(sites, CLASSIFIER_STEPS), "logistic", cfg)      # doctest: +SKIP

Each site state (:class:`ClassifierSite`) holds its arrays (:class:`SiteArrays`), the study's classifier
settings, its policy's ``min_cohort`` / ``max_epsilon`` and its DP ledger, kept between rounds and models as a
site keeps its ledger file. :data:`CLASSIFIER_STEPS` answers each action with the same reply functions as the
Flower site steps (:func:`client.classifier.site.train_reply`, :func:`~client.classifier.site.evaluate_reply`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from client.classifier.data import stratified_split
from client.classifier.site import evaluate_reply, train_reply
from common.classifier.protocol import EVALUATE, MOMENTS, TRAIN
from common.classifier.training import site_feature_moments
from common.config import ClassifierConfig
from common.protocol import Payload, SiteFunction
from common.sitedata import SitePolicy


@dataclass
class SiteArrays:
    """One site's classifier inputs (they stay at the site in a real federation); features raw, not scaled."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_ids: list[str] = field(default_factory=list)
    strata: dict[str, list[str]] = field(default_factory=dict)  # attribute -> level of each held-out case
    attributes: dict[str, str] = field(default_factory=dict)  # vendor, field_strength
    masks_test: np.ndarray | None = None  # image model: tumour masks of the held-out crops
    feature_names: list[str] = field(default_factory=list)  # default: x0, x1, ...


@dataclass
class ClassifierSite:
    """An in-memory site: its arrays, the study's settings, its policy, and its DP ledger."""

    site_id: str
    data: SiteArrays
    cfg: ClassifierConfig
    min_cohort: int = 5
    max_epsilon: float = math.inf
    overlay_dir: Path | None = None  # Grad-CAM overlays of the image model
    study_hash: str = "inprocess"
    dp_state: dict | None = None
    policy: SitePolicy | None = None  # bounds the evaluation reply; None: the default policy at min_cohort


def memory_sites(arrays: Mapping[str, SiteArrays], cfg: ClassifierConfig, *, min_cohort: int = 5,
                 max_epsilon: float = math.inf, overlay_dir: Path | None = None,
                 policy: SitePolicy | None = None) -> dict[str, ClassifierSite]:
    """Fresh site states over ``arrays`` (empty DP ledgers); overlays go to ``overlay_dir/<site>``; ``policy``
    bounds their evaluation replies (None: the default policy at ``min_cohort``)."""
    return {s: ClassifierSite(s, a, cfg, min_cohort, max_epsilon,
                              (Path(overlay_dir) / s) if overlay_dir is not None else None, policy=policy)
            for s, a in arrays.items()}


def feature_site_arrays(features: Mapping[str, pd.DataFrame], labels: Mapping[str, pd.Series],
                        cfg: ClassifierConfig, clinical: Mapping[str, pd.DataFrame] | None = None,
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
                               dict((attributes or {}).get(site, {})), feature_names=[str(c) for c in frame.columns])
    return out


def _names(data: SiteArrays) -> list[str]:
    return list(data.feature_names) or [f"x{i}" for i in range(np.asarray(data.x_train).shape[1])]


def moments_site(site: ClassifierSite, payload: Payload) -> Payload:
    """``classifier_moments`` at an in-memory site."""
    reply = site_feature_moments(site.site_id, site.data.x_train, _names(site.data), site.min_cohort)
    reply["feature_source"] = "memory"
    return reply


def train_site(site: ClassifierSite, payload: Payload) -> Payload:
    """``train.classifier`` at an in-memory site; its DP ledger carries over to the next round and model."""
    reply, site.dp_state = train_reply(site.site_id, payload, site.data.x_train, site.data.y_train, site.cfg,
                                       min_cohort=site.min_cohort, max_epsilon=site.max_epsilon,
                                       dp_state=site.dp_state, study_hash=site.study_hash)
    return reply


def evaluate_site(site: ClassifierSite, payload: Payload) -> Payload:
    """``evaluate.classifier`` at an in-memory site (with its scanner attributes, as a real site sends)."""
    d = site.data
    reply = evaluate_reply(site.site_id, payload, d.x_test, d.y_test, site.cfg, min_cohort=site.min_cohort,
                           strata=d.strata, masks=d.masks_test, overlay_dir=site.overlay_dir,
                           case_ids=d.test_ids or None, policy=site.policy)
    reply.update({k: str(v) for k, v in d.attributes.items()})
    return reply


CLASSIFIER_STEPS: dict[str, SiteFunction] = {MOMENTS: moments_site, TRAIN: train_site, EVALUATE: evaluate_site}
"""The in-memory site function of each classifier action (no Nyúl round: the arrays are already features)."""
