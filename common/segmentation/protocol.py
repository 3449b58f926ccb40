"""The segmentation protocol: federated training and evaluation of one plan's network (Flower-free driver).

Rounds, by query action (site steps in :mod:`client.steps.segmentation`, the server phase in
:mod:`server.phases.segmentation`):

* ``segmentation_cohort``: each site's training and held-out case counts (below ``min_cohort`` it refuses);
  whoever answers is the cohort.
* ``evaluate.segmentation`` of the initial model (round 0), then per round ``train.segmentation`` (the global
  weights, the round number, the proximal mu and the plan) and, every ``evaluate_every`` rounds and after the
  last, ``evaluate.segmentation`` of the new global model.

Every training reply is checked with :func:`check_update` against the global model it started from; a bad
one is rejected and recorded with its site, the others go to the strategy's ``aggregate``. A site may fail a
round (the query lists it in ``failures``): the round goes on with the others. Evaluation replies are each
site's summary of its held-out cases, pooled with :func:`pool_summaries`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import SegmentationConfig
from common.errors import ProtocolError
from common.protocol import NUM_EXAMPLES_KEY, WEIGHT_PREFIX, Payload, Query, pack_weights, unpack_weights
from common.segmentation.aggregation import Aggregate, Update, check_update
from common.segmentation.metrics import pool_summaries

log = logging.getLogger(__name__)

COHORT = "segmentation_cohort"
TRAIN = "train.segmentation"
EVALUATE = "evaluate.segmentation"
PLAN_KEY = "plan_json"  # the plan, as JSON, in every train, evaluate and inference request
ROUND_KEY = "server-round"
PROXIMAL_MU_KEY = "proximal-mu"
EPSILON_KEY = "epsilon"  # a DP site's epsilon spent so far, in its train reply

OnModel = Callable[[int, dict[str, np.ndarray]], None]
"""``on_model(round, weights)``: called with each round's new global model (not when no update was accepted)."""


@dataclass
class RoundRecord:
    """What one round saw: per-site train metrics (accepted replies) and evaluation summaries, rejections, errors."""

    round: int
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    pooled: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    aggregated: bool = False

    def epsilon(self) -> dict[str, float]:
        """Each accepted site's epsilon spent so far (sites training without DP report 0)."""
        return {site: float(m.get(EPSILON_KEY, 0.0)) for site, m in self.train.items()}


@dataclass
class SegmentationRun:
    """A federated segmentation run: the cohort's case counts, every round's record, the final global model."""

    cohort: dict[str, dict[str, int]]
    rounds: list[RoundRecord]
    weights: dict[str, np.ndarray]


def model_request(weights: Mapping[str, np.ndarray], server_round: int, plan_json: str,
                  proximal_mu: float = 0.0) -> Payload:
    """A train or evaluate request: the global weights, the round number, the proximal mu and the plan."""
    return {**pack_weights(weights), ROUND_KEY: int(server_round), PROXIMAL_MU_KEY: float(proximal_mu),
            PLAN_KEY: plan_json}


def scalars(reply: Mapping[str, object]) -> dict[str, float]:
    """The numeric scalars of a reply (its metrics), without the weights."""
    return {k: float(v) for k, v in reply.items()  # type: ignore[arg-type]
            if not k.startswith(WEIGHT_PREFIX) and isinstance(v, (int, float, np.number))}


def reply_problem(reply: Mapping[str, object], reference: Mapping[str, np.ndarray], max_norm: float,
                  bound: float | None = None) -> str | None:
    """Why a train reply cannot be aggregated (None when it can).

    ``bound``: the training cases the site reported in the cohort round; a larger ``num-examples`` (a site
    weighting itself over the others in FedAvg) is rejected.
    """
    count = reply.get(NUM_EXAMPLES_KEY)
    if isinstance(count, bool) or not isinstance(count, (int, float, np.number)):
        return f"the reply lacks a scalar {NUM_EXAMPLES_KEY!r}"
    if bound is not None and float(count) > bound:
        return f"{NUM_EXAMPLES_KEY} exceeds the training cases the site reported in the cohort round"
    bad = sorted(k for k, v in scalars(reply).items() if not math.isfinite(v))
    if bad:
        return f"metric(s) {bad} are not finite"
    try:
        new = unpack_weights(reply)
    except Exception as exc:  # noqa: BLE001 - an undecodable array is a bad reply, not a server crash
        return f"arrays cannot be decoded ({exc})"
    return check_update(new, reference, max_norm, float(count))


def screen_updates(record: RoundRecord, replies: Mapping[str, Payload], reference: Mapping[str, np.ndarray],
                   max_norm: float, bounds: Mapping[str, float] | None = None) -> list[Update]:
    """The replies that may be aggregated; the others are rejected, logged and recorded with their site.

    With ``bounds`` (training cases by site, from the cohort round) a site outside it, or claiming more
    cases than it reported, is rejected.
    """
    kept: list[Update] = []
    for site in sorted(replies):
        reply = replies[site]
        if bounds is not None and site not in bounds:
            problem: str | None = "the site is not in the cohort of this training"
        else:
            problem = reply_problem(reply, reference, max_norm, None if bounds is None else bounds[site])
        if problem is not None:
            record.rejected.append({"site": site, "reason": problem})
            log.warning("round %d: rejected the update of site %s: %s", record.round, site, problem)
            continue
        record.train[site] = scalars(reply)
        kept.append(Update(site, unpack_weights(reply), float(reply[NUM_EXAMPLES_KEY])))  # type: ignore[arg-type]
    return kept


def _record_failures(record: RoundRecord, query: Query, action: str) -> None:
    for site, reason in sorted(query.failures.items()):
        record.errors.append({"site": site, "reason": reason})
        log.warning("round %d: %s: site %s answered an error: %s", record.round, action, site, reason)


def evaluate_model(query: Query, record: RoundRecord, weights: Mapping[str, np.ndarray], plan_json: str) -> None:
    """One federated evaluation: every site's held-out summary of ``weights``, and their pooled summary."""
    replies = query(EVALUATE, model_request(weights, record.round, plan_json))
    _record_failures(record, query, EVALUATE)
    record.evaluate = {site: scalars(reply) for site, reply in sorted(replies.items())}
    if not record.evaluate:
        return
    try:
        record.pooled = pool_summaries(record.evaluate)
    except Exception as exc:  # noqa: BLE001 - a malformed summary must not end the study
        log.warning("round %d: evaluation summaries cannot be pooled: %s", record.round, exc)


def train_round(query: Query, record: RoundRecord, weights: dict[str, np.ndarray], plan_json: str,
                cfg: SegmentationConfig, aggregate: Aggregate,
                bounds: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """One training round: local training at every site, screening, aggregation; the new global model."""
    mu = cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0
    replies = query(TRAIN, model_request(weights, record.round, plan_json, mu))
    _record_failures(record, query, TRAIN)
    kept = screen_updates(record, replies, weights, cfg.max_update_norm, bounds)
    if not kept:
        log.warning("round %d: no valid update; the global model stays as it was", record.round)
        return weights
    record.aggregated = True
    return {k: np.asarray(v) for k, v in aggregate(record.round, kept).items()}


def check_cohort(replies: Mapping[str, Payload], failures: Mapping[str, str], min_sites: int
                 ) -> dict[str, dict[str, int]]:
    """Each cohort site's training and held-out case counts; raises when fewer than ``min_sites`` can train."""
    cohort = {site: {"n_train": int(r["n_train"]), "n_heldout": int(r["n_heldout"])}  # type: ignore[call-overload]
              for site, r in sorted(replies.items())}
    if len(cohort) < min_sites:
        reasons = "; ".join(f"{s}: {r}" for s, r in sorted(failures.items())) or "no other site answered"
        raise ProtocolError("(cohort)", f"{len(cohort)} site(s) can train, the study needs {min_sites} ({reasons})",
                            "add sites, or lower min_sites in the study config")
    return cohort


def run_segmentation(query: Query, plan: Mapping[str, Any], initial_weights: Mapping[str, np.ndarray],
                     cfg: SegmentationConfig, aggregate: Aggregate, *, min_sites: int = 1,
                     on_model: OnModel | None = None) -> SegmentationRun:
    """Drive the cohort round, the round-0 evaluation and ``cfg.rounds`` training rounds through ``query``.

    ``aggregate`` is the strategy's rule over the accepted updates; ``on_model`` sees each new global model.
    Later rounds go to the cohort; a site failing one is recorded in that round's ``errors``.
    """
    replies = query(COHORT, {})
    cohort = check_cohort(replies, query.failures, min_sites)
    bounds = {site: float(c["n_train"]) for site, c in cohort.items()}  # FedAvg weights bounded by these
    plan_json = json.dumps(plan)
    weights = {k: np.asarray(v) for k, v in initial_weights.items()}
    start = RoundRecord(0)
    evaluate_model(query, start, weights, plan_json)
    rounds = [start]
    every = max(1, int(cfg.evaluate_every))
    for rnd in range(1, cfg.rounds + 1):
        record = RoundRecord(rnd)
        weights = train_round(query, record, weights, plan_json, cfg, aggregate, bounds)
        if record.aggregated and on_model is not None:
            on_model(rnd, weights)
        if rnd % every == 0 or rnd == cfg.rounds:
            evaluate_model(query, record, weights, plan_json)
        rounds.append(record)
        log.info("segmentation round %d/%d: %d update(s) aggregated, %d rejected, %d error(s)", rnd, cfg.rounds,
                 len(record.train), len(record.rejected), len(record.errors))
    return SegmentationRun(cohort, rounds, weights)
