"""A site's classification data: labels, the deterministic train / held-out split, features and tumour crops.

The split is stratified by label and depends only on the patient ids and the study seed, so a site, the
in-memory sites (:mod:`client.classifier.memory`) and any rerun agree on the held-out cases. Everything here
stays at the site.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.config import StudyConfig
from common.errors import PolicyError, SiteDataError
from common.sitedata import Case, Site

log = logging.getLogger(__name__)


def stratified_split(patient_ids: Sequence[str], labels: Sequence[int], fraction: float, seed: int
                     ) -> tuple[list[str], list[str]]:
    """(train, held-out) ids: within each label, ``round(fraction * n)`` cases held out by hash order."""
    train: list[str] = []
    held: list[str] = []
    ids = [str(p) for p in patient_ids]
    labs = [int(v) for v in labels]
    for level in sorted(set(labs)):
        group = sorted((p for p, v in zip(ids, labs, strict=True) if v == level),
                       key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
        k = int(round(fraction * len(group)))
        held += group[:k]
        train += group[k:]
    order = {p: i for i, p in enumerate(ids)}
    return sorted(train, key=order.__getitem__), sorted(held, key=order.__getitem__)


def site_labels(site: Site, column: str) -> pd.Series:
    """The binary label of every valid case, by patient_id; raises naming clinical.csv when unusable."""
    frame = site.clinical_frame()
    if column not in frame.columns:
        raise SiteDataError(site.root / "clinical.csv", f"no label column {column!r}",
                            "add it or set classifier.label to an existing column")
    y = pd.to_numeric(frame[column], errors="coerce")
    bad = y.index[~y.isin([0, 1])].tolist()
    if bad:
        raise SiteDataError(site.root / "clinical.csv", f"label {column!r} is not 0/1 for {bad[:5]}",
                            "code the label as 0 or 1 for every patient")
    return y.astype(int)


@dataclass(frozen=True)
class SplitData:
    """The split of one site (ids only) with its labels and clinical strata."""

    site_id: str
    train: list[str]
    test: list[str]
    labels: pd.Series
    clinical: pd.DataFrame


def site_split(site: Site, study: StudyConfig) -> SplitData:
    """Labels and the train / held-out split; refuses when either part is below the site's ``min_cohort``."""
    cfg = study.classifier
    labels = site_labels(site, cfg.label)
    train, test = stratified_split(list(labels.index), list(labels.values), cfg.holdout_fraction, cfg.seed)
    need = site.config.policy.min_cohort
    for what, ids in (("training", train), ("held-out", test)):
        if len(ids) < need:
            raise PolicyError(site.site_id, "min_cohort", f"{len(ids)} {what} case(s) for the classifier "
                              f"(holdout_fraction {cfg.holdout_fraction:g}), policy needs at least {need}")
    return SplitData(site.site_id, train, test, labels, site.clinical_frame())


def crop_centred(volume: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``size``^3 crop of (C, Z, Y, X) ``volume`` and its (Z, Y, X) mask, centred on the mask's centroid."""
    idx = np.argwhere(mask > 0)
    if idx.size == 0:
        raise SiteDataError("mask", "is empty", "draw the tumour before classifying it")
    centre = np.round(idx.mean(axis=0)).astype(int)
    half = size // 2
    lo = centre - half
    pad = [(0, 0)] + [(size, size)] * 3
    vp = np.pad(volume, pad)
    mp = np.pad(mask, pad[1:])
    sl = tuple(slice(int(c + size), int(c + size + size)) for c in lo)
    return vp[(slice(None), *sl)], mp[sl]


def tumour_crops(cases: Sequence[Case], sequences: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops of every case (N, C, S, S, S), each channel z-scored over its whole image, and their masks."""
    from client.segmentation.data import load_volume

    crops, masks = [], []
    for case in cases:
        vol = load_volume(case, sequences)
        if vol.label is None:
            raise SiteDataError(case.patient_id, "has no tumour mask", "draw or segment the tumour first")
        c, m = crop_centred(vol.image, vol.label[0], size)
        crops.append(c)
        masks.append(m)
    return np.stack(crops).astype(np.float32), np.stack(masks).astype(np.uint8)
