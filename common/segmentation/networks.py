"""The segmentation network of a plan, and its weights as plain named numpy arrays.

The server builds it for the initial weights, every site for training, evaluation and inference; torch, MONAI
and nnU-Net are imported only when a network is built.

Only parameters and buffers travel, each once under its first name (``named_parameters`` / ``named_buffers``
de-duplicate): an nnU-Net ``state_dict`` repeats the encoder under ``decoder.encoder`` and is ~3x larger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from common.errors import ProtocolError
from common.segmentation.network_schema import io_channels, monai_unet_kwargs
from common.weights import load_named_arrays, named_arrays


def build_network(plan: Mapping[str, Any], seed: int | None = None) -> Any:
    """The plan's network (MONAI UNet or nnU-Net from plans), freshly initialised (seeded when given).

    The plan comes from the server: only allowed architectures with checked numbers are built
    (:mod:`common.segmentation.network_schema`), never a class the plan names.
    """
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    in_ch, n_cls = io_channels(plan)
    if plan.get("network") == "nnunet":
        from common.segmentation.nnunet_adapter import build_nnunet_network

        nnunet = plan.get("nnunet")
        return build_nnunet_network(nnunet.get("plans") if isinstance(nnunet, Mapping) else None,  # type: ignore[arg-type]
                                    in_ch, n_cls)
    if plan.get("network") == "monai":
        from monai.networks.nets import UNet

        m = monai_unet_kwargs(plan.get("monai"))  # type: ignore[arg-type]
        return UNet(spatial_dims=3, in_channels=in_ch, out_channels=n_cls, channels=m["channels"],
                    strides=m["strides"], num_res_units=m["num_res_units"],
                    act=("leakyrelu", {"negative_slope": 0.01, "inplace": False}), norm=("instance", {"affine": True}))
    raise ProtocolError("(plan)", "network is neither 'monai' nor 'nnunet'", "use 'monai' or 'nnunet'")


def get_weights(net: Any) -> dict[str, np.ndarray]:
    """The network's parameters and buffers, each once, as float32 numpy arrays (CPU copies)."""
    return named_arrays(net, np.float32)


def set_weights(net: Any, weights: Mapping[str, np.ndarray], site_id: str = "(local)") -> None:
    """Copy ``weights`` (from :func:`get_weights`) into the network; names and shapes must match exactly."""
    load_named_arrays(net, weights, site_id, "run the same plan and fedbiopsy version everywhere")


def count_parameters(net: Any) -> int:
    """Number of trainable values."""
    return int(sum(p.numel() for p in net.parameters()))
