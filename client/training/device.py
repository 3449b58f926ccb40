"""Where local training runs: CUDA with mixed precision when present, else the CPU."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)


def pick_device(prefer: str | None = None) -> Any:
    """``torch.device("cuda")`` when available (or ``prefer`` when given), else the CPU."""
    import torch

    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: Any, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA when ``enabled``; a no-op elsewhere."""
    import torch

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def set_threads(threads: int) -> None:
    """Limit torch's CPU threads (0: leave the default)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
