"""The local optimisation step: patches in, Dice + cross-entropy, optional FedProx term and DP-SGD."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.segmentation.data import PatchSampler
from client.training.device import autocast
from client.training.dp import PrivateStep

log = logging.getLogger(__name__)


def make_loss() -> Any:
    """MONAI Dice + cross-entropy on softmax outputs and one-hot targets, Dice per sample (DP-compatible)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(softmax=True, to_onehot_y=False, batch=False)


def one_hot(labels: Any, num_classes: int) -> Any:
    """(B, 1, *S) integer labels as (B, K, *S) float one-hot."""
    import torch

    oh = torch.nn.functional.one_hot(labels[:, 0].long(), num_classes)
    return oh.movedim(-1, 1).float()


def make_optimizer(net: Any, kind: str, lr: float, weight_decay: float) -> Any:
    """Adam or SGD (Nesterov, momentum 0.99 as nnU-Net) over the trainable parameters."""
    import torch

    params = [p for p in net.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@dataclass
class StepSettings:
    """How one round of local steps runs."""

    steps: int
    batch_size: int
    num_classes: int
    optimizer: str
    lr: float
    weight_decay: float
    amp: bool
    proximal_mu: float = 0.0
    seed: int = 0
    schedule: str = "constant"  # "poly": nnU-Net's lr * (1 - t / total) ** 0.9 over the whole schedule
    step_offset: int = 0  # steps taken before this call (earlier rounds)
    total_steps: int = 0  # steps of the whole schedule (0: this call's steps)

    def lr_at(self, i: int) -> float:
        """The learning rate of this call's ``i``-th step."""
        if self.schedule != "poly":
            return self.lr
        total = self.total_steps or self.steps
        return self.lr * max(0.0, 1.0 - (self.step_offset + i) / total) ** 0.9


def run_local_steps(net: Any, sampler: PatchSampler, settings: StepSettings, device: Any,
                    global_params: Mapping[str, Any] | None = None, dp: Any = None) -> dict[str, float]:
    """Train ``net`` in place for ``settings.steps`` steps; returns the mean loss and the steps done.

    FedProx: without DP the proximal term ``mu/2 ||w - w_global||^2`` is added to the loss; with DP (whose
    optimizer only sees clipped per-sample gradients) the same term's gradient is applied as a separate,
    data-independent step after each private step. ``dp`` is a :class:`client.training.dp.DPPlan` or None.
    """
    import torch

    net.to(device).train()
    loss_fn = make_loss()
    optimizer = make_optimizer(net, settings.optimizer, settings.lr, settings.weight_decay)
    private = PrivateStep(net, optimizer, dp, settings.batch_size, settings.seed) if dp is not None else None
    opt = private.optimizer if private is not None else optimizer
    use_amp = settings.amp and device.type == "cuda" and private is None
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    anchors = None
    if settings.proximal_mu > 0 and global_params is not None:
        anchors = {n: global_params[n].detach().to(device) for n, p in net.named_parameters() if p.requires_grad}
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    losses = []
    try:
        for i in range(settings.steps):
            lr = settings.lr_at(i)
            for group in opt.param_groups:
                group["lr"] = lr
            x_np, y_np = sampler.batch(settings.batch_size)
            x = torch.from_numpy(x_np).to(device)
            y = one_hot(torch.from_numpy(y_np).to(device), settings.num_classes)
            opt.zero_grad(set_to_none=True)
            with autocast(device, use_amp):
                loss = loss_fn(net(x), y)
                total = loss
                if anchors is not None and private is None:
                    prox = sum(((p - anchors[n]) ** 2).sum() for n, p in named)
                    total = loss + 0.5 * settings.proximal_mu * prox
            if scaler is not None:
                scaler.scale(total).backward()
                scaler.step(opt)
                scaler.update()
            else:
                total.backward()
                opt.step()
            if anchors is not None and private is not None:
                with torch.no_grad():
                    for n, p in named:
                        p.add_(p - anchors[n], alpha=-lr * settings.proximal_mu)
            losses.append(float(loss.detach()))
    finally:
        if private is not None:
            private.close()
    return {"train-loss": float(np.mean(losses)) if losses else float("nan"), "steps": float(len(losses))}
