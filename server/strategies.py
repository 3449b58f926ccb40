"""The aggregation rule of each segmentation strategy, computed by Flower's own strategies.

The rounds, and the validation of every reply, are :func:`common.segmentation.protocol.run_segmentation`'s;
this module gives it the ``aggregate`` callable of the study's ``segmentation.strategy``:

* ``fedavg``: ``flwr.serverapp.strategy.FedAvg``, weighted by each site's ``num-examples``;
* ``fedprox``: ``FedProx``, whose aggregation is FedAvg's (the site adds the proximal term
  ``mu/2 ||w - w_global||^2``; the driver sends ``proximal-mu``);
* ``fedmedian``: ``FedMedian`` (coordinate-wise median, case counts ignored);
* ``trimmed``: ``FedTrimmedAvg`` with ``beta = trim_beta`` (coordinate-wise trimmed mean).

The accepted updates are handed to the strategy's ``aggregate_train`` as the train reply Messages it expects
(one ArrayRecord of weights, one MetricRecord with ``num-examples``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg

from common.config import SegmentationConfig
from common.errors import ProtocolError
from common.protocol import NUM_EXAMPLES_KEY
from common.segmentation.aggregation import Aggregate, Update

Strategy = FedAvg | FedProx | FedMedian | FedTrimmedAvg


def make_flower_strategy(cfg: SegmentationConfig) -> Strategy:
    """The Flower strategy of the study's ``segmentation.strategy`` (only its aggregation is used)."""
    common = {"weighted_by_key": NUM_EXAMPLES_KEY, "min_train_nodes": 1, "min_evaluate_nodes": 1,
              "min_available_nodes": 1}
    if cfg.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)  # type: ignore[arg-type]
    if cfg.strategy == "fedmedian":
        return FedMedian(**common)  # type: ignore[arg-type]
    if cfg.strategy == "trimmed":
        return FedTrimmedAvg(beta=cfg.trim_beta, **common)  # type: ignore[arg-type]
    return FedAvg(**common)  # type: ignore[arg-type]


def train_reply(update: Update, server_round: int, index: int = 0) -> Message:
    """An accepted update as the train reply Message a Flower strategy aggregates.

    Written against Flower 1.42's ``Message(metadata=..., content=...)`` constructor: the strategies'
    ``aggregate_train`` read only the content (one ArrayRecord, one MetricRecord with ``num-examples``) and
    ``has_error()``; ``tests/segmentation/test_strategies.py`` pins the result to the weighted mean, the median
    and the trimmed mean.
    """
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in update.weights.items()})
    metrics = MetricRecord({NUM_EXAMPLES_KEY: float(update.num_examples)})
    meta = Metadata(run_id=0, message_id=f"{update.site}-{server_round}", src_node_id=index + 1, dst_node_id=0,
                    reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=0.0,
                    message_type=MessageType.TRAIN)
    return Message(metadata=meta, content=RecordDict({"arrays": arrays, "metrics": metrics}))  # type: ignore[call-overload]


def make_aggregate(cfg: SegmentationConfig) -> Aggregate:
    """``aggregate(server_round, updates) -> weights`` by the study's Flower strategy."""
    strategy = make_flower_strategy(cfg)

    def aggregate(server_round: int, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        if not updates:
            raise ProtocolError("(server)", f"round {server_round}: no update to aggregate")
        replies = [train_reply(u, server_round, i) for i, u in enumerate(updates)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        if arrays is None:
            raise ProtocolError("(server)", f"round {server_round}: the {cfg.strategy} strategy aggregated nothing")
        return {k: a.numpy() for k, a in arrays.items()}

    return aggregate
