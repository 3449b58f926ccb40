"""The classifiers' networks and their weights as named numpy arrays, built alike by the server (initial
weights) and the sites (local training, evaluation).

* ``logistic``: one linear layer on the standardised features (float64, so that FedAvg parity tests can go to
  1e-10);
* ``mlp``: linear - tanh - linear (float64);
* ``image``: a small MONAI 3D ResNet (basic blocks, instance norm so that DP-SGD and FedAvg need no batch
  statistics) on tumour-centred crops of all sequences, two output logits.

Feature models output one logit; the score is its sigmoid. The image model's score is the softmax of class 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.config import ClassifierConfig
from common.errors import ProtocolError
from common.weights import load_named_arrays, named_arrays

FEATURE_MODELS: tuple[str, ...] = ("logistic", "mlp")


def rounds_of(kind: str, cfg: ClassifierConfig) -> int:
    """FedAvg rounds of a model kind."""
    return cfg.image_rounds if kind == "image" else cfg.rounds


def build_feature_model(kind: str, n_features: int, hidden: int = 16, seed: int = 0) -> Any:
    """A fresh feature model (float64), seeded."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    if kind == "logistic":
        linear = nn.Linear(n_features, 1)
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
        net = nn.Sequential(linear)
    elif kind == "mlp":
        first, last = nn.Linear(n_features, hidden), nn.Linear(hidden, 1)
        with torch.no_grad():
            for layer in (first, last):
                bound = float(1.0 / np.sqrt(layer.in_features))
                layer.weight.copy_(torch.empty(tuple(layer.weight.shape)).uniform_(-bound, bound, generator=gen))
                layer.bias.zero_()
        net = nn.Sequential(first, nn.Tanh(), last)
    else:
        raise ProtocolError("(model)", f"unknown feature model {kind!r}", f"use one of {FEATURE_MODELS}")
    return net.double()


def build_image_model(in_channels: int, channels: Sequence[int] = (8, 16, 32, 64), seed: int = 0) -> Any:
    """A tiny 3D ResNet for crops (MONAI), instance norm, two output logits."""
    import torch
    from monai.networks.nets import ResNet

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's random state
        torch.manual_seed(seed)
        return ResNet(block="basic", layers=[1] * len(channels), block_inplanes=list(channels), spatial_dims=3,
                      n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=1, no_max_pool=True,
                      num_classes=2, act=("relu", {"inplace": False}), norm=("instance", {"affine": True}))


def build_model(kind: str, n_features: int, study_cfg: ClassifierConfig, n_channels: int = 2) -> Any:
    """The study's model of ``kind``: ``n_features`` inputs (feature models) or ``n_channels`` (image)."""
    if kind == "image":
        return build_image_model(n_channels, study_cfg.image_channels, study_cfg.seed)
    return build_feature_model(kind, n_features, study_cfg.mlp_hidden, study_cfg.seed)


def model_weights(net: Any) -> dict[str, np.ndarray]:
    """Parameters and floating buffers as numpy copies, in the model's own precision."""
    return named_arrays(net)


def load_weights(net: Any, weights: Mapping[str, np.ndarray], site_id: str = "(local)") -> None:
    """Copy named arrays into the model; names and shapes must match."""
    load_named_arrays(net, weights, site_id, "run the same study config and fedbiopsy version everywhere")


def feature_scores(net: Any, x: np.ndarray) -> np.ndarray:
    """Sigmoid scores of a feature model on standardised features (cases x features)."""
    import torch

    net.eval()
    with torch.no_grad():
        logits = net(torch.as_tensor(np.asarray(x, dtype=np.float64)))
    return torch.sigmoid(logits[:, 0]).numpy().astype(np.float64)


def image_scores(net: Any, crops: np.ndarray, batch: int = 8) -> np.ndarray:
    """Softmax score of class 1 of the image model on crops (cases x channels x Z x Y x X)."""
    import torch

    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            logits = net(torch.as_tensor(np.asarray(crops[i:i + batch], dtype=np.float32)))
            out.append(torch.softmax(logits, dim=1)[:, 1].numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
