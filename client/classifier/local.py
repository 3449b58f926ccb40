"""A site's local classifier steps (Flower-free): full-batch gradient descent, minibatches, optional DP-SGD.

Feature models: the loss is the mean binary cross-entropy over the site's training cases plus
``(l2 / 2) ||W||^2`` on the weight matrices (biases unpenalised), minimised by plain gradient descent. With one
full-batch step per round, FedAvg weighted by case counts is *exactly* gradient descent on the pooled loss
(the case-weighted mean of the sites' gradients is the pooled gradient), which is what the parity test checks.
More local steps per round trade that exactness for fewer rounds.

DP-SGD (Opacus, patient level) reuses :mod:`client.training.dp` (the segmentation's accountant, noise sizing
and budget refusal): batches of ``dp.batch_size`` distinct patients, per-sample clipping, Gaussian noise. The
L2 penalty is then applied as a separate data-independent decay after each private step, since Opacus only
privatises the per-sample gradients of the data term.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.training.dp import DPPlan, PrivateStep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalSettings:
    """One round of local optimisation."""

    steps: int
    lr: float
    l2: float = 0.0
    batch_size: int | None = None  # None: full batch (without DP)
    optimizer: str = "sgd"  # "sgd" (plain gradient descent) or "adam"
    seed: int = 0


def _penalised(net: Any) -> list[Any]:
    return [p for n, p in net.named_parameters() if n.endswith("weight") and p.ndim >= 2]


def run_local_steps(net: Any, batch_fn: Callable[[np.random.Generator, int | None], tuple[Any, Any]],
                    loss_fn: Callable[[Any, Any], Any], settings: LocalSettings, dp: DPPlan | None = None) -> dict:
    """Train ``net`` in place; ``batch_fn(rng, size)`` gives (inputs, targets), ``size`` None for all cases."""
    import torch

    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    if settings.optimizer == "adam":
        optimizer: Any = torch.optim.Adam(params, lr=settings.lr)
    else:
        optimizer = torch.optim.SGD(params, lr=settings.lr)
    private = PrivateStep(net, optimizer, dp, settings.batch_size or 1, settings.seed) if dp is not None else None
    opt = private.optimizer if private is not None else optimizer
    rng = np.random.default_rng(settings.seed)
    decay = _penalised(net)
    losses: list[float] = []
    try:
        with warnings.catch_warnings():
            # Opacus' hooks on a first layer whose input needs no gradient: torch warns; per-sample grads are right
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            for _ in range(settings.steps):
                x, y = batch_fn(rng, settings.batch_size)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(x), y)
                total = loss
                if private is None and settings.l2 > 0:
                    total = loss + 0.5 * settings.l2 * sum((w**2).sum() for w in decay)
                total.backward()
                opt.step()
                if private is not None and settings.l2 > 0:
                    with torch.no_grad():
                        for w in decay:
                            w.mul_(1.0 - settings.lr * settings.l2)
                losses.append(float(loss.detach()))
    finally:
        if private is not None:
            private.close()
    return {"train-loss": float(np.mean(losses)) if losses else float("nan"), "steps": float(len(losses))}


def feature_batches(x: np.ndarray, y: np.ndarray) -> Callable[[np.random.Generator, int | None], tuple[Any, Any]]:
    """Batches of standardised features: all cases, or ``size`` distinct cases drawn uniformly."""
    import torch

    xt = torch.as_tensor(np.asarray(x, dtype=np.float64))
    yt = torch.as_tensor(np.asarray(y, dtype=np.float64)).reshape(-1, 1)

    def batch(rng: np.random.Generator, size: int | None) -> tuple[Any, Any]:
        if size is None or size >= len(xt):
            return xt, yt
        take = torch.as_tensor(rng.choice(len(xt), size=size, replace=False))
        return xt[take], yt[take]

    return batch


def bce_loss() -> Callable[[Any, Any], Any]:
    """Mean binary cross-entropy on logits."""
    import torch

    return torch.nn.BCEWithLogitsLoss(reduction="mean")


def crop_batches(crops: np.ndarray, y: np.ndarray, augment: bool = True
                 ) -> Callable[[np.random.Generator, int | None], tuple[Any, Any]]:
    """Batches of image crops (distinct cases), with random flips on every axis when ``augment``."""
    import torch

    def batch(rng: np.random.Generator, size: int | None) -> tuple[Any, Any]:
        n = len(crops)
        take = np.arange(n) if size is None or size >= n else rng.choice(n, size=size, replace=False)
        xb = np.asarray(crops[take], dtype=np.float32).copy()
        if augment:
            for i in range(len(xb)):
                for axis in (1, 2, 3):
                    if rng.uniform() < 0.5:
                        xb[i] = np.flip(xb[i], axis=axis)
        return torch.as_tensor(np.ascontiguousarray(xb)), torch.as_tensor(np.asarray(y[take], dtype=np.int64))

    return batch


def ce_loss() -> Callable[[Any, Any], Any]:
    """Mean cross-entropy on two logits."""
    import torch

    return torch.nn.CrossEntropyLoss(reduction="mean")
