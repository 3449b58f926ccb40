"""The wire format of fedbiopsy's query phases, shared by the ClientApp and the ServerApp.

A payload is a flat ``dict`` of named numpy arrays and scalars (int, float, str, bool, lists of those).
Arrays travel in an ``ArrayRecord`` under ``"arrays"``, everything else in a ``ConfigRecord`` under
``"config"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

Payload = dict[str, object]
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"


def encode(payload: Mapping[str, object]) -> RecordDict:
    """A payload as a RecordDict."""
    arrays: dict[str, Array] = {}
    config: dict[str, object] = {}
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            arrays[key] = Array(np.ascontiguousarray(value))
        elif isinstance(value, np.generic):
            config[key] = value.item()
        elif isinstance(value, (list, tuple)):
            config[key] = list(value)
        else:
            config[key] = value
    content = RecordDict()
    content[ARRAYS_KEY] = ArrayRecord(arrays)
    content[CONFIG_KEY] = ConfigRecord(config)  # type: ignore[arg-type]
    return content


def decode(content: RecordDict) -> Payload:
    """A RecordDict produced by :func:`encode` as a payload."""
    out: Payload = {}
    if ARRAYS_KEY in content.array_records:
        for key, arr in content.array_records[ARRAYS_KEY].items():
            out[key] = arr.numpy()
    if CONFIG_KEY in content.config_records:
        out.update(dict(content.config_records[CONFIG_KEY]))
    return out
