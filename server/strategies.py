"""Flower strategies of the segmentation phase, with every reply validated before aggregation.

FedAvg (weighted by training cases), FedProx (the site adds the proximal term; ``proximal-mu`` travels in the
train config), FedMedian and FedTrimmedAvg come from ``flwr.serverapp.strategy``. :class:`ValidatingMixin` runs
:func:`common.segmentation.aggregation.check_update` on every train reply (same array names and shapes as the
global model, finite values, a positive case count, an update norm within ``max_update_norm``), drops and logs a
bad reply with its site, and keeps per-site records of every round (train metrics, epsilon, evaluation
summaries, rejections) that Flower's ``Result`` does not hold.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg

from common.config import SegmentationConfig
from common.segmentation.aggregation import check_update
from common.segmentation.metrics import headline, pool_summaries

log = logging.getLogger("fedbiopsy.server")
WEIGHT_KEY = "num-examples"


@dataclass
class RoundRecords:
    """What the strategy saw, by round: per-site train metrics and evaluation summaries, rejections, errors."""

    train: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    pooled: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    rejected: dict[int, list[dict[str, str]]] = field(default_factory=dict)
    errors: dict[int, list[dict[str, str]]] = field(default_factory=dict)


class ValidatingMixin:
    """Validate train replies against the global model before the base strategy aggregates them."""

    site_names: Mapping[int, str]
    max_update_norm: float
    records: RoundRecords
    on_aggregate: Callable[[int, ArrayRecord], None] | None
    _global: dict[str, np.ndarray]

    def setup_validation(self, site_names: Mapping[int, str], max_update_norm: float,
                         on_aggregate: Callable[[int, ArrayRecord], None] | None = None,
                         evaluate_every: int = 1, last_round: int | None = None) -> None:
        """Node id -> site id (for logs), the update-norm bound, a callback for each new global model, and
        which rounds are evaluated (every ``evaluate_every``-th, and ``last_round``)."""
        self.evaluate_every = max(1, int(evaluate_every))
        self.last_round = last_round
        self.site_names = dict(site_names)
        self.max_update_norm = float(max_update_norm)
        self.records = RoundRecords()
        self.on_aggregate = on_aggregate
        self._global = {}

    def site_of(self, node_id: int) -> str:
        """The site id of a node (``node-<id>`` when unknown)."""
        return self.site_names.get(node_id, f"node-{node_id}")

    def remember_global(self, arrays: ArrayRecord) -> None:
        """The global model that this round's updates are checked against."""
        self._global = {k: v.numpy() for k, v in arrays.items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.remember_global(arrays)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if server_round % self.evaluate_every and server_round != self.last_round:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def reply_problem(self, msg: Message) -> str | None:
        """Why a train reply cannot be aggregated (None when it can)."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return (f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} and "
                    f"{len(content.metric_records)}")
        metrics = next(iter(content.metric_records.values()))
        count = metrics.get(WEIGHT_KEY)
        if not isinstance(count, (int, float)):
            return f"the MetricRecord lacks a scalar {WEIGHT_KEY!r}"
        bad = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isfinite(float(v))]
        if bad:
            return f"metric(s) {bad} are not finite"
        arrays = next(iter(content.array_records.values()))
        try:
            new = {k: a.numpy() for k, a in arrays.items()}
        except Exception as exc:  # noqa: BLE001 - an undecodable array is a bad reply, not a server crash
            return f"arrays cannot be decoded ({exc})"
        return check_update(new, self._global, self.max_update_norm, float(count))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept: list[Message] = []
        self.records.train[server_round] = {}
        for msg in replies:
            site = self.site_of(msg.metadata.src_node_id)
            if msg.has_error():
                self.records.errors.setdefault(server_round, []).append({"site": site, "reason": str(msg.error.reason)})
                log.warning("round %d: site %s answered an error: %s", server_round, site, msg.error.reason)
                continue
            problem = self.reply_problem(msg)
            if problem is not None:
                self.records.rejected.setdefault(server_round, []).append({"site": site, "reason": problem})
                log.warning("round %d: rejected the update of site %s: %s", server_round, site, problem)
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            self.records.train[server_round][site] = {k: float(v) for k, v in metrics.items()
                                                      if not isinstance(v, list)}
            kept.append(msg)
        if not kept:
            log.warning("round %d: no valid update; the global model stays as it was", server_round)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        if arrays is not None and self.on_aggregate is not None:
            self.on_aggregate(server_round, arrays)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        sites: dict[str, dict[str, float]] = {}
        replies = list(replies)
        if not replies:
            return None
        for msg in replies:
            site = self.site_of(msg.metadata.src_node_id)
            if msg.has_error():
                self.records.errors.setdefault(server_round, []).append({"site": site, "reason": str(msg.error.reason)})
                log.warning("round %d: site %s could not evaluate: %s", server_round, site, msg.error.reason)
                continue
            if len(msg.content.metric_records) != 1:
                log.warning("round %d: site %s sent a malformed evaluation reply", server_round, site)
                continue
            sites[site] = {k: float(v) for k, v in next(iter(msg.content.metric_records.values())).items()
                           if not isinstance(v, list)}
        self.records.evaluate[server_round] = sites
        if not sites:
            return None
        try:
            pooled = pool_summaries(sites)
        except Exception as exc:  # noqa: BLE001 - a malformed summary must not end the study
            log.warning("round %d: evaluation summaries cannot be pooled: %s", server_round, exc)
            return None
        self.records.pooled[server_round] = pooled
        return MetricRecord(headline(pooled))  # type: ignore[arg-type]

    def evaluate_now(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                     timeout: float) -> MetricRecord | None:
        """One federated evaluation outside the training loop (e.g. of the initial model, round 0)."""
        messages = self.configure_evaluate(server_round, arrays, config, grid)  # type: ignore[attr-defined]
        return self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))


class ValidatedFedAvg(ValidatingMixin, FedAvg):
    """FedAvg weighted by training cases, replies validated."""


class ValidatedFedProx(ValidatingMixin, FedProx):
    """FedProx (the site adds ``mu/2 ||w - w_global||^2``), replies validated."""


class ValidatedFedMedian(ValidatingMixin, FedMedian):
    """Coordinate-wise median, replies validated."""


class ValidatedFedTrimmedAvg(ValidatingMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean, replies validated."""


ValidatedStrategy = ValidatedFedAvg | ValidatedFedProx | ValidatedFedMedian | ValidatedFedTrimmedAvg


def make_strategy(cfg: SegmentationConfig, min_nodes: int, site_names: Mapping[int, str],
                  on_aggregate: Callable[[int, ArrayRecord], None] | None = None) -> ValidatedStrategy:
    """The study's strategy, every node sampled every round, with reply validation set up."""
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_nodes,
                  min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes, weighted_by_key=WEIGHT_KEY)
    strategy: ValidatedStrategy
    if cfg.strategy == "fedprox":
        strategy = ValidatedFedProx(proximal_mu=cfg.proximal_mu, **common)  # type: ignore[arg-type]
    elif cfg.strategy == "fedmedian":
        strategy = ValidatedFedMedian(**common)  # type: ignore[arg-type]
    elif cfg.strategy == "trimmed":
        strategy = ValidatedFedTrimmedAvg(beta=cfg.trim_beta, **common)  # type: ignore[arg-type]
    else:
        strategy = ValidatedFedAvg(**common)  # type: ignore[arg-type]
    strategy.setup_validation(site_names, cfg.max_update_norm, on_aggregate, cfg.evaluate_every, cfg.rounds)
    return strategy
