"""Checking the fields of a site's reply before the server step uses them."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.errors import ProtocolError


def reply_field(site: str, reply: Mapping[str, object], key: str, protocol: str, non_finite_fix: str) -> np.ndarray:
    """``reply[key]`` as a float array; a missing or non-finite field raises :class:`ProtocolError` naming the site."""
    if key not in reply:
        raise ProtocolError(site, f"{protocol} reply lacks {key!r}", "run the same fedbiopsy version at every site")
    value = np.asarray(reply[key], dtype=np.float64)
    if not np.all(np.isfinite(value)):
        raise ProtocolError(site, f"{protocol} field {key!r} is not finite", non_finite_fix)
    return value
