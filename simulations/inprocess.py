"""In-process federated protocols: every site's and the server's steps called in turn, without Flower.

Each protocol's runner lives in its own module and is re-exported here.
"""

from __future__ import annotations

from simulations.inprocess_combat import (  # noqa: F401 - re-exported
    federated_combat,
    federated_feature_reduction,
)
from simulations.inprocess_outcomes import (  # noqa: F401 - re-exported
    federated_cox,
    federated_kaplan_meier,
    federated_kmeans,
    federated_logrank,
)
