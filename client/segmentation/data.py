"""A site's segmentation cases as arrays, the train / held-out split, and the patch sampler.

Images are stacked in the study's sequence order (channels first, array order z, y, x) and normalised per case
and channel to zero mean and unit variance (nnU-Net's scheme for MRI). The split is a deterministic function of
the patient ids and the study seed, so a site, the centralised baseline and any rerun agree on the held-out
cases. Each training batch draws distinct patients (one patch each), so a patient is the privacy unit of DP-SGD.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from common.imageio import read_image
from common.sitedata import Case

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Volume:
    """One case ready for training or inference (stays at the site)."""

    patient_id: str
    image: np.ndarray  # (C, Z, Y, X) float32, z-scored per channel
    label: np.ndarray | None  # (1, Z, Y, X) uint8 (0 background, 1 tumour)
    spacing: tuple[float, float, float]  # mm, array order (z, y, x)


def zscore(channel: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (a constant channel becomes zeros)."""
    x = channel.astype(np.float32)
    sd = float(x.std())
    return (x - float(x.mean())) / (sd if sd > 0 else 1.0)


def load_volume(case: Case, sequences: Sequence[str]) -> Volume:
    """Read one case's sequences (and mask when present) as a :class:`Volume`."""
    channels = []
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    for i, seq in enumerate(sequences):
        img = read_image(case.images[seq])
        if i == 0:
            spacing = tuple(float(s) for s in reversed(img.GetSpacing()))  # type: ignore[assignment]
        channels.append(zscore(sitk.GetArrayFromImage(img)))
    label = None
    if case.mask is not None:
        label = (sitk.GetArrayFromImage(read_image(case.mask)) > 0).astype(np.uint8)[None]
    return Volume(case.patient_id, np.stack(channels), label, spacing)


def split_cases(cases: Sequence[Case], holdout_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """(train, held-out) among the cases with masks; the order depends only on patient ids and ``seed``."""
    labelled = [c for c in cases if c.mask is not None]
    order = sorted(labelled, key=lambda c: hashlib.sha256(f"{seed}:{c.patient_id}".encode()).hexdigest())
    n_hold = int(round(holdout_fraction * len(order)))
    n_hold = min(max(n_hold, 1), len(order) - 1) if len(order) >= 2 else 0
    return order[n_hold:], order[:n_hold]


def pad_to(volume: Volume, patch: Sequence[int]) -> Volume:
    """The volume padded (zeros at the end of each axis) to at least the patch size."""
    shape = volume.image.shape[1:]
    if all(s >= p for s, p in zip(shape, patch, strict=True)):
        return volume
    pad = [(0, 0)] + [(0, max(0, p - s)) for s, p in zip(shape, patch, strict=True)]
    label = None if volume.label is None else np.pad(volume.label, pad)
    return Volume(volume.patient_id, np.pad(volume.image, pad), label, volume.spacing)


class PatchSampler:
    """Random training patches with augmentation (MONAI transforms), seeded.

    ``foreground_ratio`` of the patches are centred on a tumour voxel, the rest anywhere. Augmentation: flips on
    every axis, in-plane 90-degree rotations, intensity scaling and shifts, Gaussian noise.
    """

    def __init__(self, volumes: Sequence[Volume], patch: Sequence[int], foreground_ratio: float, augment: bool,
                 seed: int) -> None:
        from monai.transforms import (
            Compose,
            RandCropByPosNegLabeld,
            RandFlipd,
            RandGaussianNoised,
            RandRotate90d,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        if not volumes:
            raise ValueError("no training volume to sample patches from")
        self.patch = [int(p) for p in patch]
        self.items = []
        for v in volumes:
            if v.label is None:
                raise ValueError(f"case {v.patient_id} has no mask and cannot be used for training")
            v = pad_to(v, self.patch)
            label = v.label if v.label is not None else np.zeros((1, *v.image.shape[1:]), np.uint8)
            flat = label[0].ravel()
            self.items.append({"image": v.image, "label": label,
                               "fg": np.flatnonzero(flat), "bg": np.flatnonzero(flat == 0)})
        keys = ["image", "label"]
        pos = float(foreground_ratio)
        steps: list[Any] = [RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=self.patch, pos=pos,
                                        neg=1.0 - pos, num_samples=1, fg_indices_key="fg", bg_indices_key="bg")]
        if augment:
            steps += [RandFlipd(keys=keys, prob=0.5, spatial_axis=a) for a in range(3)]
            if self.patch[1] == self.patch[2]:
                steps.append(RandRotate90d(keys=keys, prob=0.5, spatial_axes=(1, 2)))
            steps += [RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                      RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
                      RandGaussianNoised(keys="image", prob=0.15, std=0.05)]
        self.transform = Compose(steps)
        self.transform.set_random_state(seed=seed % (2**32))
        self.rng = np.random.default_rng(seed)

    @property
    def n_cases(self) -> int:
        return len(self.items)

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(images (B, C, *patch) float32, labels (B, 1, *patch) uint8), one patch per distinct patient."""
        replace = batch_size > len(self.items)
        idx = self.rng.choice(len(self.items), size=batch_size, replace=replace)
        images, labels = [], []
        for i in idx:
            out = self.transform(dict(self.items[int(i)]))
            out = out[0] if isinstance(out, list) else out
            images.append(np.asarray(out["image"], dtype=np.float32))
            labels.append(np.asarray(out["label"], dtype=np.uint8))
        return np.stack(images), np.stack(labels)
