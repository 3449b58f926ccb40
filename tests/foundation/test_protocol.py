"""The protocol core: message types, the Flower-free codec, the in-memory query, and the Flower codec at both
edges agreeing with it."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ProtocolError
from common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    MANIFEST_KEY,
    PACKED_KEY,
    InMemoryQuery,
    message_type,
    pack_arrays,
    pack_weights,
    round_trip,
    to_wire,
    unpack_arrays,
    unpack_weights,
)


def test_actions_map_to_flower_message_types() -> None:
    assert message_type("fingerprint") == "query.fingerprint"
    assert message_type("train.segmentation") == "train.segmentation"
    assert message_type("evaluate.classifier") == "evaluate.classifier"
    with pytest.raises(ValueError, match="only train"):
        message_type("query.fingerprint")  # the category is the transport's, not the protocol's


def test_codec_keeps_arrays_and_scalars_and_refuses_what_a_message_cannot_hold() -> None:
    payload = {"x": np.arange(6.0).reshape(2, 3), "n": np.int64(4), "names": ("a", "b"), "ok": True}
    arrays, config = to_wire(payload)
    assert set(arrays) == {"x"} and config == {"n": 4, "names": ["a", "b"], "ok": True}
    assert isinstance(config["n"], int)
    back = round_trip(payload)
    np.testing.assert_array_equal(back["x"], payload["x"])
    assert back["x"] is not payload["x"]  # the receiver never shares the sender's memory
    for bad in ({"none": None}, {"nested": {"a": 1}}, {3: 1.0}):
        with pytest.raises(ValueError):
            to_wire(bad)  # type: ignore[arg-type]


def test_weights_pack_under_their_prefix_and_unpack_alone() -> None:
    weights = {"conv.weight": np.ones((2, 2)), "conv.bias": np.zeros(2)}
    payload = {**pack_weights(weights), "round": 3}
    assert sorted(payload) == ["round", "w/conv.bias", "w/conv.weight"]
    out = unpack_weights(round_trip(payload))
    assert sorted(out) == sorted(weights) and all(np.array_equal(out[k], weights[k]) for k in weights)


def test_in_memory_query_asks_every_site_in_order_through_the_codec_and_the_wire() -> None:
    seen: list[tuple[str, str, str]] = []

    def wire(direction: str, action: str, site: str, payload: dict) -> dict:
        seen.append((direction, action, site))
        return payload

    def count(state: list[float], request: dict) -> dict:
        return {"n": len(state), "sum": np.asarray(sum(state)) * float(request["scale"])}

    query = InMemoryQuery({"b": [1.0, 2.0], "a": [3.0]}, {"count": count}, wire=wire)
    replies = query("count", {"scale": 2.0})
    assert replies["a"]["n"] == 1 and float(replies["b"]["sum"]) == 6.0
    assert seen == [("request", "count", "a"), ("reply", "count", "a"), ("request", "count", "b"),
                    ("reply", "count", "b")]
    assert query.actions == ["count"] and query.failures == {}
    with pytest.raises(ProtocolError, match="no site step answers"):
        query("other", {})


def test_in_memory_query_refuses_a_reply_a_message_could_not_carry() -> None:
    query = InMemoryQuery({"a": None}, {"leak": lambda state, request: {"rows": {"p1": 3.0}}})
    with pytest.raises(ValueError, match="cannot travel"):
        query("leak", {})


def test_flower_codec_of_the_site_and_of_the_server_agree_with_the_common_one() -> None:
    from client.app import decode as site_decode
    from client.app import encode as site_encode
    from server.federation import decode as server_decode
    from server.federation import encode as server_encode

    payload = {"x": np.linspace(0, 1, 5), "k": 3, "names": ["a", "b"], "text": "é"}
    for encode, decode in ((site_encode, server_decode), (server_encode, site_decode)):
        out = decode(encode(payload))
        np.testing.assert_array_equal(out["x"], payload["x"])
        assert {k: v for k, v in out.items() if k != "x"} == {"k": 3, "names": ["a", "b"], "text": "é"}


def test_a_message_carries_all_its_arrays_as_one_packed_array() -> None:
    from server.federation import encode

    weights = {f"w/layer{i}": np.full((3, 4), float(i), dtype=np.float32) for i in range(48)}
    content = encode({**weights, "labels": np.array(["a", "bc"]), "empty": np.zeros((0, 2)), "n": 5})
    record = content.array_records[ARRAYS_KEY]
    assert list(record) == [PACKED_KEY]  # one Flower object, not 50: one request per hop instead of ~100
    out = unpack_arrays({PACKED_KEY: record[PACKED_KEY].numpy()}, content.config_records[CONFIG_KEY][MANIFEST_KEY])
    assert set(out) == {*weights, "labels", "empty"}
    assert all(np.array_equal(out[k], v) and out[k].dtype == v.dtype for k, v in weights.items())
    assert out["labels"].tolist() == ["a", "bc"] and out["empty"].shape == (0, 2)


@pytest.mark.parametrize("tamper", ["extra_bytes", "overlap", "object_dtype", "void_dtype", "too_big", "twice",
                                    "not_json", "second_array", "zero_itemsize", "bool_shape", "wrapping_shape",
                                    "deep_json", "datetime"])
def test_a_packed_message_that_does_not_add_up_is_refused(tamper: str) -> None:
    import json

    buffer, manifest = pack_arrays({"a": np.arange(4, dtype=np.int64), "b": np.ones(2)})
    entries = json.loads(manifest)
    arrays: dict[str, np.ndarray] = {PACKED_KEY: buffer}
    if tamper == "extra_bytes":
        arrays[PACKED_KEY] = np.concatenate([buffer, np.zeros(8, np.uint8)])
    elif tamper == "overlap":
        entries[1][3] = 0
    elif tamper == "object_dtype":
        entries[1][1] = "|O"
    elif tamper == "void_dtype":
        entries[1][1] = "|V16"
    elif tamper == "too_big":
        entries[1][2] = [10**12]
    elif tamper == "twice":
        entries[1][0] = "a"
    elif tamper == "second_array":
        arrays["other"] = np.zeros(1)
    elif tamper == "zero_itemsize":
        entries[1][1] = "<U0"
    elif tamper == "bool_shape":
        entries[1][2] = [True, True]
    elif tamper == "wrapping_shape":  # 2**64 elements: an int64 product would wrap to 0
        entries[1][2] = [2**32, 2**32]
    elif tamper == "datetime":
        entries[1][1] = "<M8[s]"
    text = {"not_json": "{", "deep_json": "[" * 100_000}.get(tamper, json.dumps(entries))
    with pytest.raises(ProtocolError, match="packed arrays"):
        unpack_arrays(arrays, text)
