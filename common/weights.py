"""A torch module's weights as named numpy arrays, and back: what travels between the server and the sites."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ProtocolError


def _own(net: Any) -> dict[str, Any]:
    """The module's parameters and floating buffers (running statistics), by name."""
    own = dict(net.named_parameters())
    own.update((n, b) for n, b in net.named_buffers() if b.is_floating_point())
    return own


def named_arrays(net: Any, dtype: type | None = None) -> dict[str, np.ndarray]:
    """Parameters and floating buffers as numpy copies (in ``dtype``, or the module's own precision)."""
    out = {}
    for name, tensor in _own(net).items():
        array = tensor.detach().cpu().numpy()
        out[name] = array.astype(dtype or array.dtype, copy=True)
    return out


def load_named_arrays(net: Any, weights: Mapping[str, np.ndarray], site_id: str, fix: str) -> None:
    """Copy named arrays into the module; names and shapes must match exactly, else :class:`ProtocolError`
    naming the site, the first names or the shape at fault, and ``fix``."""
    import torch

    own = _own(net)
    missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or extra:
        raise ProtocolError(site_id, f"weights do not fit the model (missing {missing[:3]}, unexpected {extra[:3]})",
                            fix)
    with torch.no_grad():
        for name, tensor in own.items():
            value = np.asarray(weights[name])
            if tuple(value.shape) != tuple(tensor.shape):
                raise ProtocolError(site_id, f"weight {name!r} has shape {value.shape}, the model "
                                             f"{tuple(tensor.shape)}", fix)
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(tensor.dtype))


def save_weights(weights: Mapping[str, np.ndarray], path: Path) -> Path:
    """Weights as an ``.npz`` (no pickle), keyed by parameter name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **weights)  # type: ignore[arg-type]
    return path


def load_weights(path: Path | str) -> dict[str, np.ndarray]:
    """Weights written by :func:`save_weights` (no pickle is ever loaded)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
