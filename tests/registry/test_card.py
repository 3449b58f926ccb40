"""FUTURE-AI model cards and export bundles, from the scripted history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import RegistryConfig, StudyConfig
from common.hashing import sha256_file
from server.registry import Registry, RegistryError, card_markdown, export_version, model_card
from server.registry.future_ai import ITEMS, STATUSES
from tests.registry.history import MANIFEST


def test_card_evidence_of_a_dp_classifier(history: Registry) -> None:
    card = model_card(history, "v5")
    assert card["version"] == "v5" and card["kind"] == "classifier" and card["round"] == 3
    assert [(s["site_id"], s["n_cases"], s["manifest_hash"], s["vendor"]) for s in card["data"]["sites"]] == [
        ("A", 5, MANIFEST["A"], "Siemens"), ("B", 6, MANIFEST["B"], "GE")]
    assert card["metrics"]["external_sites"] == ["C"] and card["metrics"]["pooled"] == {"auc": 0.75}
    auc, fpr = card["fairness"]["auc"], card["fairness"]["fpr"]
    assert (auc["best"]["site"], auc["worst"]["site"], auc["higher_is_better"]) == ("A", "C", True)
    assert auc["gap"] == pytest.approx(0.15)
    assert (fpr["best"]["site"], fpr["worst"]["site"], fpr["higher_is_better"]) == ("A", "B", False)
    assert fpr["gap"] == pytest.approx(0.20)
    assert card["robustness"]["metrics_by_field_strength"]["3.0"]["auc"] == pytest.approx((0.80 + 0.65) / 2)
    assert set(card["robustness"]["metrics_by_vendor"]) == {"Siemens", "GE", "Philips"}
    assert card["privacy"] == {"differential_privacy": True, "epsilon": {"A": 1.5, "B": 2.5}, "max_epsilon": 2.5,
                               "delta": 1e-5, "aggregates_only": True}
    assert [x["version"] for x in card["lineage"]] == ["v5", "v4", "v3", "v2", "v1"]
    assert card["audit"]["verified"] and card["audit"]["event_seq"] == 11

    items = {i["code"]: i for i in card["future_ai"]}
    assert list(items) == [it.code for it in ITEMS] and len(items) == 30
    assert all(i["status"] in STATUSES for i in items.values())
    assert all(i["status"] == "organisational" for i in items.values() if i["scope"] == "organisational")
    assert items["Un3"]["status"] == "evidenced" and "C" in items["Un3"]["evidence"]
    assert items["T5"]["status"] == "evidenced" and "#11" in items["T5"]["evidence"]
    assert items["F3"]["status"] == "partly evidenced" and "auc gap 0.15 (worst C)" in items["F3"]["evidence"]
    assert "done" not in json.dumps(card).lower()

    md = card_markdown(card)
    for heading in ("## Intended use", "## Data per site (2 sites, 11 cases)", "## Metrics per site",
                    "### Fairness gap", "## Robustness", "## Explainability", "## Privacy", "## Lineage",
                    "## Limitations", "## FUTURE-AI recommendations"):
        assert heading in md
    assert "| C (external) | 0.65 | 0.2 |" in md and "- auc: gap 0.15" in md
    assert md.count("| organisational |") == sum(i["status"] == "organisational" for i in items.values())


def test_card_of_a_plan_without_metrics_says_what_is_missing(history: Registry) -> None:
    card = model_card(history, "v6")
    items = {i["code"]: i for i in card["future_ai"]}
    assert items["F3"]["status"] == items["Un3"]["status"] == "not evidenced"
    assert card["fairness"] == {} and card["privacy"]["differential_privacy"] is False
    assert any("No external validation" in x for x in card["limitations"])
    assert any("No differential privacy" in x for x in card["limitations"])


def test_card_states_the_studys_intended_use(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(b"m")
    study = StudyConfig(registry=RegistryConfig(intended_use="Research only: subtype of paediatric tumours."))
    run = registry.start_run(study, tmp_path)
    registry.record_phase(run, "classifier", {"artifacts": [{"kind": "classifier", "path": "m.pt"}]}, {"A": 5},
                          tmp_path)
    card = model_card(registry, "v1")
    assert card["intended_use"] == {"statement": "Research only: subtype of paediatric tumours.",
                                    "source": "study config"}
    assert "paediatric" in next(i for i in card["future_ai"] if i["code"] == "Us1")["evidence"]


def test_card_reports_a_broken_registry(history: Registry) -> None:
    path = history.store.path_of(history.version("v3").artifact_sha256)  # an ancestor of v5
    path.write_bytes(b"tampered")
    card = model_card(history, "v5")
    assert card["audit"]["verified"] is False and "v3" in card["audit"]["first_problem"]
    assert next(i for i in card["future_ai"] if i["code"] == "T5")["status"] == "not evidenced"
    assert any("does NOT verify" in x for x in card["limitations"])


def test_export_bundle(history: Registry, tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    files = export_version(history, "v4", dest)
    assert sorted(p.name for p in files) == sorted(["v4-clf2.pt", "model_card.md", "model_card.json", "lineage.json",
                                                    "audit_events.json", "SHA256SUMS"])
    assert (dest / "v4-clf2.pt").read_bytes() == b"round-2 weights"
    sums = dict(reversed(line.split("  ")) for line in (dest / "SHA256SUMS").read_text().splitlines())
    assert len(sums) == 5 and all(sha256_file(dest / name) == h for name, h in sums.items())
    lineage = json.loads((dest / "lineage.json").read_text())
    assert [x["label"] for x in lineage] == ["v4", "v3", "v2", "v1"]
    assert {s["site_id"] for x in lineage for s in x["sites"]} == {"A", "B", "C", "E"}
    audit = json.loads((dest / "audit_events.json").read_text())
    assert {e["subject"] for e in audit["events"]} == {"run:1", "version:1", "version:2", "version:3", "version:4"}
    assert audit["head"]["seq"] == 19
    assert json.loads((dest / "model_card.json").read_text())["version"] == "v4"
    with pytest.raises(RegistryError, match="already holds"):
        export_version(history, "v4", dest)
