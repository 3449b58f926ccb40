"""Server strategies: exact aggregation of known arrays, and rejection of bad replies with their site."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from common.config import SegmentationConfig
from common.segmentation.aggregation import check_update, coordinate_median, trimmed_mean, weighted_mean
from server.strategies import make_strategy

NODES = {11: "site-A", 12: "site-B", 13: "site-C"}


def reply(node: int, arrays: dict[str, np.ndarray], n: float, extra_metrics: dict | None = None) -> Message:
    """A train reply from ``node`` as the ServerApp receives it."""
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, **(extra_metrics or {})})})
    return Message(metadata=meta, content=content)


def strategy_with_global(kind: str, global_w: dict[str, np.ndarray], max_norm: float = 100.0, **kw: object):
    strategy = make_strategy(SegmentationConfig(strategy=kind, max_update_norm=max_norm, **kw), 2, NODES)
    strategy.remember_global(ArrayRecord({k: Array(v) for k, v in global_w.items()}))
    return strategy


GLOBAL = {"conv.weight": np.zeros((2, 3), dtype=np.float32), "conv.bias": np.zeros(2, dtype=np.float32)}
A = {"conv.weight": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32), "conv.bias": np.array([8, -4], np.float32)}
B = {"conv.weight": np.array([[5, 6, 7], [0, 1, 2]], dtype=np.float32), "conv.bias": np.array([0, 4], np.float32)}
C = {"conv.weight": np.array([[3, 9, 1], [2, 2, 2]], dtype=np.float32), "conv.bias": np.array([4, 0], np.float32)}


def test_fedavg_of_known_arrays_is_exact_and_weighted_by_cases() -> None:
    strategy = strategy_with_global("fedavg", GLOBAL)
    arrays, metrics = strategy.aggregate_train(1, [reply(11, A, 1), reply(12, B, 3)])
    got = {k: v.numpy() for k, v in arrays.items()}
    # 1/4 A + 3/4 B, exactly representable in float32.
    assert np.array_equal(got["conv.weight"], np.array([[4, 5, 6], [1, 2, 3]], dtype=np.float32))
    assert np.array_equal(got["conv.bias"], np.array([2, 2], dtype=np.float32))
    oracle = weighted_mean([A, B], [1, 3])
    assert all(np.array_equal(got[k], oracle[k]) for k in oracle)
    assert strategy.records.train[1].keys() == {"site-A", "site-B"}


@pytest.mark.parametrize("kind", ["fedmedian", "trimmed"])
def test_robust_strategies_match_the_numpy_rules(kind: str) -> None:
    strategy = strategy_with_global(kind, GLOBAL, trim_beta=0.34)
    arrays, _ = strategy.aggregate_train(1, [reply(11, A, 1), reply(12, B, 5), reply(13, C, 2)])
    got = {k: v.numpy() for k, v in arrays.items()}
    oracle = coordinate_median([A, B, C]) if kind == "fedmedian" else trimmed_mean([A, B, C], 0.34)
    assert all(np.allclose(got[k], oracle[k], rtol=0, atol=1e-6) for k in oracle)
    # With three sites both rules pick the middle value per coordinate (case counts ignored).
    assert np.allclose(got["conv.bias"], [4, 0])


def test_nan_and_oversized_updates_are_rejected_and_logged_with_their_site(caplog: pytest.LogCaptureFixture) -> None:
    strategy = strategy_with_global("fedavg", GLOBAL, max_norm=50.0)
    nan = {k: v.copy() for k, v in A.items()}
    nan["conv.weight"][0, 0] = np.nan
    huge = {k: v * 1000 for k, v in C.items()}
    with caplog.at_level(logging.WARNING, logger="fedbiopsy.server"):
        arrays, _ = strategy.aggregate_train(1, [reply(11, nan, 1), reply(12, B, 3), reply(13, huge, 2)])
    got = {k: v.numpy() for k, v in arrays.items()}
    assert all(np.array_equal(got[k], B[k]) for k in B)  # only site-B's update was averaged
    rejected = {r["site"]: r["reason"] for r in strategy.records.rejected[1]}
    assert set(rejected) == {"site-A", "site-C"}
    assert "NaN" in rejected["site-A"] and "exceeds the bound 50" in rejected["site-C"]
    assert "site-A" in caplog.text and "site-C" in caplog.text


def test_wrong_shapes_names_or_counts_are_rejected_and_nothing_left_keeps_the_model() -> None:
    strategy = strategy_with_global("fedprox", GLOBAL, proximal_mu=0.1)
    shape = {"conv.weight": np.zeros((3, 2), np.float32), "conv.bias": np.zeros(2, np.float32)}
    names = {"conv.weight": np.zeros((2, 3), np.float32)}
    arrays, metrics = strategy.aggregate_train(1, [reply(11, shape, 1), reply(12, names, 1), reply(13, A, 0)])
    assert arrays is None and metrics is None
    reasons = [r["reason"] for r in strategy.records.rejected[1]]
    assert "shape" in reasons[0] and "names differ" in reasons[1] and "positive" in reasons[2]


def test_check_update_bound_is_on_the_update_not_the_weights() -> None:
    ref = {"w": np.full(4, 100.0)}
    assert check_update({"w": np.full(4, 101.0)}, ref, max_norm=2.5) is None  # norm 2
    assert "exceeds" in check_update({"w": np.full(4, 102.0)}, ref, max_norm=2.5)  # norm 4
