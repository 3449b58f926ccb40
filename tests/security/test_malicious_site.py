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
