"""A malicious site may choose every field of its replies: it must not pass as another site, and a reply with
a non-finite number must not count (:class:`server.federation.Federation`, issue 21 part 4).

The spoof runs through Flower's simulation engine: a ClientApp mod at one site rewrites the site id of its
replies after the first round, to the id of another site that is connected. The server must reject those
replies (the node answered as its own site first) and keep the real site's. With a roster (deployment: the
node id each hospital's registered key was given), a node answers only as its registered site.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from common.config import StudyConfig, load_study_config
from common.protocol import CONFIG_KEY, SITE_ID_KEY
from server.federation import Federation, ReplyRejected, check_finite, check_reply_values

pytestmark = pytest.mark.timeout(300)
VICTIM, SPOOFER = "site-001", "site-003"


def _spoof_after_first_round(spoofer: str, victim: str) -> Callable:
    """A mod at ``spoofer``: from the second roll-call round on, its replies claim to come from ``victim``."""

    def mod(msg: Any, context: Any, call_next: Callable) -> Any:
        from client.app import DATA_PATH_KEY, decode

        reply = call_next(msg, context)
        rnd = int(decode(msg.content).get("round", 0))  # type: ignore[call-overload]
        if Path(str(context.node_config[DATA_PATH_KEY])).name == spoofer and rnd > 1 and not reply.has_error():
            reply.content.config_records[CONFIG_KEY][SITE_ID_KEY] = victim
        return reply

    return mod


def test_a_site_cannot_answer_as_another_connected_site(writable_sites: list[Path], tmp_path: Path) -> None:
    from simulations.engine import run_simulated_study

    # Prepare: three sites, three roll-call rounds; site-003 claims to be site-001 from round 2 on
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump({"name": "spoof", "phases": ["rollcall"], "min_sites": 2,
                                          "rollcall": {"rounds": 3}}))
    study = load_study_config(study_path)

    # Execute
    run_simulated_study(study, study_path, writable_sites, tmp_path / "results",
                        mods=[_spoof_after_first_round(SPOOFER, VICTIM)])

    # Assert: round 1 has all three; afterwards the spoofer's replies are rejected and site-001 keeps its own
    # node and case count in every round (the spoofer's would have replaced it: both sites hold 6 cases, so
    # the node id tells them apart)
    rounds = [json.loads(line) for line in (tmp_path / "results" / "rollcall-rounds.jsonl").read_text().splitlines()]
    first = rounds[0]["sites"]
    assert sorted(first) == ["site-001", "site-002", "site-003"]
    victim_node, spoofer_node = first[VICTIM]["node"], first[SPOOFER]["node"]
    for rnd in rounds[1:]:
        assert sorted(rnd["sites"]) == ["site-001", "site-002"]
        assert rnd["sites"][VICTIM]["node"] == victim_node
        assert list(rnd["refused"]) == [spoofer_node]
        assert "reply rejected by the server" in rnd["refused"][spoofer_node]
        assert f"answered as site {SPOOFER!r}, now as {VICTIM!r}" in rnd["refused"][spoofer_node]


def _study() -> StudyConfig:
    return StudyConfig.model_validate({"name": "roster"})


def test_with_a_roster_a_node_answers_only_as_its_registered_site() -> None:
    federation = Federation(None, _study(), roster={"site-001": 11, "site-002": 12})  # type: ignore[arg-type]
    assert federation.bind(11, "site-001") == "site-001"
    assert federation.bind(12, "site-002") == "site-002"
    with pytest.raises(ReplyRejected, match="registered for 'site-002'"):
        federation.bind(12, "site-001")  # a registered node claiming another site
    with pytest.raises(ReplyRejected, match="registered for None"):
        federation.bind(13, "site-003")  # a node that is not in the roster at all
    for bad in (None, 7, "", "../site-001", "a" * 65, "site 1"):
        with pytest.raises(ReplyRejected, match="no valid site id"):
            federation.bind(11, bad)


def test_replies_with_non_finite_numbers_are_rejected() -> None:
    check_finite({"w/a": np.ones((2, 2)), "n": 3, "auc": 0.7, "labels": np.array(["a"]), "k": np.arange(3),
                  "ids": ["site-1", 2, 0.5], "flag": True})
    for bad in ({"w/a": np.array([1.0, np.nan])}, {"w/b": np.array([np.inf])}, {"auc": float("nan")},
                {"brier": float("-inf")}, {"z": np.array([1 + 0j, complex(np.nan, 0)])}, {"l": [0.1, [float("nan")]]},
                {"s": np.float32("nan")}):
        with pytest.raises(ReplyRejected, match="finite"):
            check_finite(bad)
        with pytest.raises(ReplyRejected, match="finite"):
            check_reply_values("evaluate.classifier", bad)
    check_reply_values("query.report_moments", {"sd": float("nan")})  # statistics protocols check their own
    with pytest.raises(ReplyRejected, match="object array"):
        check_reply_values("query.fingerprint", {"o": np.array([1.0, None], dtype=object)})


class _ScriptedGrid:
    """Delivers each message to a scripted site function and answers its reply (the Grid API Federation uses)."""

    def __init__(self, sites: dict[int, Callable[[Any], Any]]) -> None:
        self.sites, self.replies = sites, []

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: list[Any]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.replies.append(self.sites[msg.metadata.dst_node_id](msg))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Any) -> list[Any]:
        out, self.replies = self.replies, []
        return out


def _honest(site_id: str) -> Callable[[Any], Any]:
    from flwr.app import Message

    from server.federation import encode

    return lambda msg: Message(encode({"n_cases": 6, "round": 1, "app_hash": "", SITE_ID_KEY: site_id}), reply_to=msg)


@pytest.fixture
def in_a_run() -> Any:
    """Flower builds messages only inside a run (as a ServerApp does): give this process one."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_task_id", "_run_id", "_node_id")  # Flower's private class state; restored after the test
    before = [getattr(TaskIdentity, n) for n in names]
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    for name, value in zip(names, before, strict=True):
        setattr(TaskIdentity, name, value)


@pytest.mark.parametrize("poison", ["stype", "pickled", "huge_header", "manifest"])
def test_an_undecodable_reply_is_that_sites_error_not_the_rounds(poison: str, in_a_run: None) -> None:
    import io as _io

    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from common.protocol import ARRAYS_KEY, MANIFEST_KEY, PACKED_KEY

    def evil(msg: Any) -> Any:
        buffer = _io.BytesIO()
        if poison == "pickled":
            np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        else:
            np.save(buffer, np.zeros(4, np.uint8))
        data = buffer.getvalue()
        if poison == "huge_header":  # a header promising 10**13 bytes over four: numpy would allocate them first
            header = _io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (10**13,)})
            data = header.getvalue() + bytes(4)
        array = Array(dtype="uint8", shape=(4,), stype="evil" if poison == "stype" else "numpy.ndarray", data=data)
        config = ConfigRecord({SITE_ID_KEY: "site-003", MANIFEST_KEY: "[" * 100_000 if poison == "manifest" else "[]"})
        return Message(RecordDict({ARRAYS_KEY: ArrayRecord({PACKED_KEY: array}), CONFIG_KEY: config}), reply_to=msg)

    federation = Federation(_ScriptedGrid({1: _honest("site-001"), 2: _honest("site-002"), 3: evil}), _study())
    result = federation.send("rollcall", {"round": 1}, [1, 2, 3], minimum=2)
    assert sorted(result.replies) == ["site-001", "site-002"]
    assert list(result.errors) == [3] and "cannot be decoded" in result.errors[3]


def test_the_roster_names_each_node_once_and_only_rostered_nodes_are_asked() -> None:
    from common.errors import ConfigError
    from server.app import _roster

    assert _roster("site-001:11,site-002:12") == {"site-001": 11, "site-002": 12} and _roster("") == {}
    for bad in ("site-001:11,site-002:11", "site-001:11,site-001:12", "site-001", "site-001:x", ":4"):
        with pytest.raises(ConfigError, match="site-nodes"):
            _roster(bad)
    grid = _ScriptedGrid({11: _honest("site-001"), 12: _honest("site-002"), 13: _honest("site-003")})
    federation = Federation(grid, _study(), roster={"site-001": 11, "site-002": 12})
    assert federation.connected() == [11, 12]  # node 13 is connected but never asked: it is not in the roster
