"""Aggregation and reply screening: Flower's strategies equal the numpy rules on known arrays, and the driver the
ServerApp runs rejects bad replies with their site (through an in-memory query)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from common.config import SegmentationConfig
from common.protocol import InMemoryQuery, pack_weights
from common.segmentation.aggregation import (
    Update,
    check_update,
    coordinate_median,
    trimmed_mean,
    weighted_mean,
)
from common.segmentation.metrics import site_summary
from common.segmentation.protocol import (
    COHORT,
    EVALUATE,
    ROUND_KEY,
    TRAIN,
    SegmentationRun,
    run_segmentation,
)
from server.strategies import make_aggregate

GLOBAL = {"conv.weight": np.zeros((2, 3), dtype=np.float32), "conv.bias": np.zeros(2, dtype=np.float32)}
A = {"conv.weight": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32), "conv.bias": np.array([8, -4], np.float32)}
B = {"conv.weight": np.array([[5, 6, 7], [0, 1, 2]], dtype=np.float32), "conv.bias": np.array([0, 4], np.float32)}
C = {"conv.weight": np.array([[3, 9, 1], [2, 2, 2]], dtype=np.float32), "conv.bias": np.array([4, 0], np.float32)}
CASE = {"dsc": 0.5, "auc": 0.9, "fpr": 0.1, "fnr": 0.2, "hd95": 3.0}


def aggregate(kind: str, updates: list[Update], **kw: object) -> dict[str, np.ndarray]:
    return make_aggregate(SegmentationConfig(strategy=kind, **kw))(1, updates)


class FakeSites(InMemoryQuery):
    """Sites that answer each training round with fixed weights; ``fail`` drops a site from one round."""

    def __init__(self, replies: dict[str, tuple[dict[str, np.ndarray], float]],
                 fail: tuple[str, int] | None = None) -> None:
        super().__init__(replies, {COHORT: self.cohort, TRAIN: self.train, EVALUATE: self.evaluate})
        self.fail = fail

    @staticmethod
    def cohort(state: tuple, payload: dict) -> dict:
        return {"n_train": int(state[1]), "n_heldout": 2}

    @staticmethod
    def train(state: tuple, payload: dict) -> dict:
        weights, n = state
        return {**pack_weights(weights), "num-examples": n, "train-loss": 0.5}

    @staticmethod
    def evaluate(state: tuple, payload: dict) -> dict:
        return site_summary("fake", [CASE, CASE], min_cohort=1)

    def __call__(self, action: str, payload: dict) -> dict:
        replies = super().__call__(action, payload)
        self.failures = {}
        if self.fail is not None and action == TRAIN and payload[ROUND_KEY] == self.fail[1]:
            replies.pop(self.fail[0])
            self.failures = {self.fail[0]: "CUDA out of memory"}
        return replies


def federate(replies: dict[str, tuple[dict[str, np.ndarray], float]], kind: str = "fedavg", rounds: int = 1,
             fail: tuple[str, int] | None = None, **kw: object) -> tuple[SegmentationRun, FakeSites, list[int]]:
    cfg = SegmentationConfig(strategy=kind, rounds=rounds, **kw)
    query = FakeSites(replies, fail)
    saved: list[int] = []
    run = run_segmentation(query, {"network": "fake"}, GLOBAL, cfg, make_aggregate(cfg),
                           on_model=lambda rnd, _: saved.append(rnd))
    return run, query, saved


def test_fedavg_of_known_arrays_is_exact_and_weighted_by_cases() -> None:
    got = aggregate("fedavg", [Update("site-A", A, 1), Update("site-B", B, 3)])
    # 1/4 A + 3/4 B, exactly representable in float32.
    assert np.array_equal(got["conv.weight"], np.array([[4, 5, 6], [1, 2, 3]], dtype=np.float32))
    assert np.array_equal(got["conv.bias"], np.array([2, 2], dtype=np.float32))
    oracle = weighted_mean([A, B], [1, 3])
    assert all(np.array_equal(got[k], oracle[k]) for k in oracle)
    run, _, _ = federate({"site-A": (A, 1), "site-B": (B, 3)})
    assert run.rounds[1].train.keys() == {"site-A", "site-B"}
    assert all(np.array_equal(run.weights[k], oracle[k]) for k in oracle)


@pytest.mark.parametrize("kind", ["fedmedian", "trimmed"])
def test_robust_strategies_match_the_numpy_rules(kind: str) -> None:
    got = aggregate(kind, [Update("site-A", A, 1), Update("site-B", B, 5), Update("site-C", C, 2)], trim_beta=0.34)
    oracle = coordinate_median([A, B, C]) if kind == "fedmedian" else trimmed_mean([A, B, C], 0.34)
    assert all(np.allclose(got[k], oracle[k], rtol=0, atol=1e-6) for k in oracle)
    # With three sites both rules pick the middle value per coordinate (case counts ignored).
    assert np.allclose(got["conv.bias"], [4, 0])


def test_nan_and_oversized_updates_are_rejected_and_logged_with_their_site(caplog: pytest.LogCaptureFixture) -> None:
    nan = {k: v.copy() for k, v in A.items()}
    nan["conv.weight"][0, 0] = np.nan
    huge = {k: v * 1000 for k, v in C.items()}
    with caplog.at_level(logging.WARNING, logger="common.segmentation.protocol"):
        run, _, _ = federate({"site-A": (nan, 1), "site-B": (B, 3), "site-C": (huge, 2)}, max_update_norm=50.0)
    got = run.weights
    assert all(np.array_equal(got[k], B[k]) for k in B)  # only site-B's update was averaged
    rejected = {r["site"]: r["reason"] for r in run.rounds[1].rejected}
    assert set(rejected) == {"site-A", "site-C"}
    assert "NaN" in rejected["site-A"] and "exceeds the bound 50" in rejected["site-C"]
    assert "site-A" in caplog.text and "site-C" in caplog.text


def test_wrong_shapes_names_or_counts_are_rejected_and_nothing_left_keeps_the_model() -> None:
    shape = {"conv.weight": np.zeros((3, 2), np.float32), "conv.bias": np.zeros(2, np.float32)}
    names = {"conv.weight": np.zeros((2, 3), np.float32)}
    run, _, saved = federate({"site-A": (shape, 1), "site-B": (names, 1), "site-C": (A, 0)}, kind="fedprox",
                             proximal_mu=0.1)
    assert not run.rounds[1].aggregated and saved == []  # no new global model, none saved
    assert all(np.array_equal(run.weights[k], GLOBAL[k]) for k in GLOBAL)
    reasons = [r["reason"] for r in run.rounds[1].rejected]
    assert "shape" in reasons[0] and "names differ" in reasons[1] and "positive" in reasons[2]


def test_a_site_failing_a_round_is_recorded_and_the_rounds_go_on() -> None:
    run, query, saved = federate({"site-A": (A, 1), "site-B": (B, 3), "site-C": (C, 2)}, rounds=3,
                                 fail=("site-C", 1), evaluate_every=2)
    first, second, third = run.rounds[1:]
    assert first.errors == [{"site": "site-C", "reason": "CUDA out of memory"}]
    assert set(first.train) == {"site-A", "site-B"} and set(second.train) == {"site-A", "site-B", "site-C"}
    expected = weighted_mean([A, B, C], [1, 3, 2])  # every later round: all three sites' fixed weights
    assert saved == [1, 2, 3] and all(np.allclose(run.weights[k], expected[k], rtol=0, atol=1e-6) for k in expected)
    # round 0, every 2nd round and the last are evaluated and pooled over the cohort's held-out cases
    assert query.actions == [COHORT, EVALUATE, TRAIN, TRAIN, EVALUATE, TRAIN, EVALUATE]
    assert first.evaluate == {} and set(second.evaluate) == {"site-A", "site-B", "site-C"}
    assert third.pooled["dsc"]["n"] == 6 and third.pooled["dsc"]["median"] == pytest.approx(0.5)
    assert run.cohort == {"site-A": {"n_train": 1, "n_heldout": 2}, "site-B": {"n_train": 3, "n_heldout": 2},
                          "site-C": {"n_train": 2, "n_heldout": 2}}


def test_check_update_bound_is_on_the_update_not_the_weights() -> None:
    ref = {"w": np.full(4, 100.0)}
    assert check_update({"w": np.full(4, 101.0)}, ref, max_norm=2.5) is None  # norm 2
    assert "exceeds" in check_update({"w": np.full(4, 102.0)}, ref, max_norm=2.5)  # norm 4


def test_a_site_claiming_1e9_examples_cannot_take_over_fedavg() -> None:
    """Issue 21's takeover: FedAvg alone hands the global model to a site that claims 1e9 training cases; the
    driver bounds num-examples by the cases the site reported in the cohort round and rejects the update."""
    cfg = SegmentationConfig(strategy="fedavg", rounds=1)
    unguarded = make_aggregate(cfg)(1, [Update("site-A", A, 1), Update("site-B", B, 3), Update("site-C", C, 1e9)])
    assert all(np.allclose(unguarded[k], C[k], rtol=0, atol=1e-5) for k in C)  # the attack works on FedAvg

    def inflate(direction: str, action: str, site: str, payload: dict) -> dict:
        if direction == "reply" and action == TRAIN and site == "site-C":
            payload["num-examples"] = 1e9
        return payload

    sites = {"site-A": (A, 1), "site-B": (B, 3), "site-C": (C, 2)}
    query = InMemoryQuery(sites, {COHORT: FakeSites.cohort, TRAIN: FakeSites.train, EVALUATE: FakeSites.evaluate},
                          wire=inflate)
    run = run_segmentation(query, {"network": "fake"}, GLOBAL, cfg, make_aggregate(cfg))
    expected = weighted_mean([A, B], [1, 3])
    assert all(np.array_equal(run.weights[k], expected[k]) for k in expected)
    assert [(r["site"], "exceeds the training cases" in r["reason"]) for r in run.rounds[1].rejected] == \
        [("site-C", True)]
