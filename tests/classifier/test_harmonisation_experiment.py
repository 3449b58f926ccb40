"""The harmonisation-effect experiment: on sites with a strong field-strength effect, federated ComBat raises the
pooled AUC of the feature model above the unharmonised one, and the report shows it."""

from __future__ import annotations

import pandas as pd
import pytest

from common.config import DEFAULT_STUDY, load_study_config


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory):
    from simulations.experiment_harmonisation import run_harmonisation_experiment

    base = load_study_config(DEFAULT_STUDY.with_name("harmonisation.yaml"))
    study = load_study_config(
        DEFAULT_STUDY.with_name("harmonisation.yaml"),
        experiment={**base.experiment.model_dump(mode="json"), "patients": 24, "seed": 0, "scanner_strength": 1.5,
                    "conditions": ["none", "combat"]},
        classifier={**base.classifier.model_dump(mode="json"), "bootstrap": 50, "rounds": 100},
    )
    out = tmp_path_factory.mktemp("experiment")
    return run_harmonisation_experiment(study, out), out


def test_combat_raises_pooled_auc_above_unharmonised(experiment) -> None:
    result, _ = experiment
    none, combat = result.pooled("none", "auc"), result.pooled("combat", "auc")
    assert combat > none + 0.1, (none, combat)
    assert result.pooled("combat", "accuracy") > result.pooled("none", "accuracy")


def test_unharmonised_model_fails_one_field_strength_and_the_gap_shows_it(experiment) -> None:
    result, _ = experiment
    table = result.table()
    fs = table[table["group_kind"] == "field_strength"].set_index(["condition", "group"])
    gap = {c: abs(fs.loc[(c, "field_strength=1.5T"), "accuracy"] - fs.loc[(c, "field_strength=3T"), "accuracy"])
           for c in ("none", "combat")}
    assert gap["combat"] < gap["none"], gap
    gaps = result.summaries["none"]["fairness"]["field_strength"]["worst_group_gap"]
    assert gaps["accuracy"]["worst"] == "1.5T"  # the scanner that hides the subtype


def test_report_table_and_plot(experiment) -> None:
    result, out = experiment
    csv = pd.read_csv(out / "table.csv")
    pooled = csv[csv["group"] == "pooled"].set_index("condition")
    assert pooled.loc["combat", "auc"] == pytest.approx(result.pooled("combat", "auc"))
    assert pooled.loc["none", "auc_lo"] <= pooled.loc["none", "auc"] <= pooled.loc["none", "auc_hi"]
    assert set(csv["group"]) >= {"pooled", "site-001", "site-004", "vendor=GE", "field_strength=1.5T"}
    md = (out / "table.md").read_text()
    assert f"| federated ComBat | pooled | {int(pooled.loc['combat', 'n'])} | {pooled.loc['combat', 'auc']:.3f}" in md
    assert f"| no harmonisation | pooled | {int(pooled.loc['none', 'n'])} | {pooled.loc['none', 'auc']:.3f}" in md
    assert "Worst-group gaps" in md
    assert (out / "harmonisation.png").stat().st_size > 10_000
