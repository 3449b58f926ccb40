"""Checking the fields of a site's reply before the server step uses them, and small counts that leave as ``"<k"``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.errors import ProtocolError
from common.protocol import Payload

Count = int | str


def reply_field(site: str, reply: Mapping[str, object], key: str, protocol: str, non_finite_fix: str) -> np.ndarray:
    """``reply[key]`` as a float array; a missing or non-finite field raises :class:`ProtocolError` naming the site."""
    if key not in reply:
        raise ProtocolError(site, f"{protocol} reply lacks {key!r}", "run the same fedbiopsy version at every site")
    value = np.asarray(reply[key], dtype=np.float64)
    if not np.all(np.isfinite(value)):
        raise ProtocolError(site, f"{protocol} field {key!r} is not finite", non_finite_fix)
    return value


def small_count(name: str, n: int, cell_floor: int) -> Payload:
    """``{name: n}`` when ``n`` is 0 or at least ``cell_floor``, else ``{name: "<cell_floor>"}``."""
    return {name: int(n) if n == 0 or n >= cell_floor else f"<{int(cell_floor)}"}


def small_counts(cell_floor: int, **counts: int) -> Payload:
    """Counts of one group of cases (they add up to a total the server may know from another reply): all exact
    when each is 0 or at least ``cell_floor``; else each as ``"<k"`` or ``">=k"``, zeros included, so that
    no count follows from the total minus the others, and no 0 says that every case of a few went one way."""
    if all(n == 0 or n >= cell_floor for n in counts.values()):
        return {name: int(n) for name, n in counts.items()}
    k = int(cell_floor)
    return {name: f"<{k}" if n < k else f">={k}" for name, n in counts.items()}


def read_count(site: str, value: object) -> Count:
    """A count a site sent with :func:`small_count` (an int, or ``"<k"``); anything else is a ProtocolError."""
    if isinstance(value, str):
        if (value.startswith("<") and value[1:].isdigit()) or (value.startswith(">=") and value[2:].isdigit()):
            return value
        raise ProtocolError(site, f"count {value[:20]!r} is neither a number nor '<k' / '>=k'")
    try:
        n = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(site, "a count is not a number") from exc
    if n < 0:
        raise ProtocolError(site, "a count is negative")
    return n
