"""The report protocol: per-feature moments of the sites' feature tables before and after harmonisation.

One round (``feature_moments``): for the columns the server names, each site sends ``n`` and the per-feature
mean and SD of its table before (``before/...``) and after (``after/...``) harmonisation, over at least
``min_cohort`` patients; the server checks the replies and draws them (``server/phases/report.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.errors import ProtocolError
from common.protocol import Payload, Query
from common.replies import reply_field

FEATURE_MOMENTS = "feature_moments"
TABLES = ("before", "after")


def check_feature_moments(site: str, reply: Payload, n_columns: int) -> Payload:
    """A site's moments reply, checked: a finite count and mean, and an SD (NaN for one patient), one per
    requested column, for both tables."""
    for key in TABLES:
        reply_field(site, reply, f"{key}/mean", "feature_moments", "check the site's feature tables")
        for stat in ("mean", "sd"):
            if f"{key}/{stat}" not in reply:
                raise ProtocolError(site, f"feature_moments reply lacks {key}/{stat}",
                                    "run the same fedbiopsy version at every site")
            value = np.asarray(reply[f"{key}/{stat}"], dtype=np.float64)
            if value.shape != (n_columns,):
                raise ProtocolError(site, f"feature_moments field {key}/{stat} has {value.size} value(s), expected "
                                    f"{n_columns}", "run the same fedbiopsy version at every site")
        reply_field(site, reply, f"{key}/n", "feature_moments", "check the site's feature tables")
    return reply


def run_report(query: Query, columns: Sequence[str]) -> dict[str, Payload]:
    """Drive the moments round for ``columns``; the checked replies by site."""
    replies = query(FEATURE_MOMENTS, {"columns": [str(c) for c in columns]})
    return {site: check_feature_moments(site, reply, len(columns)) for site, reply in replies.items()}


__all__ = ["FEATURE_MOMENTS", "check_feature_moments", "run_report"]
