"""A tabular prognosis study from the CLI: six registries holding only ``site.yaml`` + ``clinical.csv`` (GBSG2
with registry headers), ``fedbiopsy study run`` in Flower's simulation engine, ``prognosis.json`` equal to
lifelines on the pooled train rows; and ``fedbiopsy validate --study`` on such a site."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from typer.testing import CliRunner

from cli.main import app
from common.config import DEFAULT_STUDY, load_study_config
from common.validation import load_site, validate_site, validate_study_columns
from simulations.tabular_sites import SPLIT_COLUMN, write_tabular_sites

PROGNOSIS_STUDY = DEFAULT_STUDY.with_name("prognosis.yaml")


def _coded(frame: pd.DataFrame, study_path: Path) -> pd.DataFrame:
    """The study's coding of the pooled rows, done here the way a statistician would, with pandas."""
    cfg = load_study_config(study_path).prognosis
    out = pd.DataFrame(index=frame.index)
    for col in cfg.covariates:
        if col in cfg.levels:
            for level in cfg.levels[col]:
                out[f"{col}={level}"] = (frame[col].astype(str) == level).astype(float)
        else:
            out[col] = frame[col].astype(float)
    out["T"], out["E"] = frame[cfg.duration], frame[cfg.event]
    return out


@pytest.mark.slow
def test_six_tabular_sites_from_the_cli(tmp_path: Path) -> None:
    sites = write_tabular_sites(tmp_path / "sites", "gbsg2", sites=6, seed=0)
    for s in sites:
        assert sorted(p.name for p in s.iterdir()) == ["clinical.csv", "site.yaml"]
        assert load_site(s).tabular
    result = CliRunner().invoke(app, ["study", "run", str(PROGNOSIS_STUDY), "--sites-dir", str(tmp_path / "sites"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "out" / "study" / "prognosis" / "prognosis.json").read_text())
    assert (tmp_path / "out" / "study" / "prognosis" / "hazard_ratios.png").stat().st_size > 10_000
    pooled = pd.concat([pd.read_csv(s / "clinical.csv") for s in sites], ignore_index=True)
    train = _coded(pooled[pooled[SPLIT_COLUMN] == "train"], PROGNOSIS_STUDY)
    test = _coded(pooled[pooled[SPLIT_COLUMN] == "test"], PROGNOSIS_STUDY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = CoxPHFitter(penalizer=0.05, l1_ratio=0.1).fit(train, "T", "E")
    assert list(out["coefficients"]) == list(ref.params_.index)
    coef = np.array(list(out["coefficients"].values()))
    assert np.abs(coef - ref.params_.to_numpy()).max() < 1e-6
    assert np.abs(np.array(list(out["se"].values())) - ref.standard_errors_.to_numpy()).max() < 1e-6
    assert np.abs(np.array(list(out["p"].values())) - ref.summary["p"].to_numpy()).max() < 1e-6
    # moments (binned, then exact: every site allows it), a round per Newton step, a risk table per split
    assert out["rounds"] == out["newton_steps"] + 4 and out["mode"] == "exact"
    assert out["n"] == {"train": len(train), "test": len(test)}
    c = out["c_index"]
    for split, data in (("train", train), ("test", test)):
        lp = ref.predict_log_partial_hazard(data).to_numpy()
        assert abs(c[split] - concordance_index(data["T"], -lp, data["E"])) <= c["bound"][split] < 0.02
    assert sorted(c["per_site"]["test"]) == [s.name for s in sites]
    assert set(out["time_dependent_auc"]["test"]) == {"365", "730", "1095", "1825"}
    assert "Registry" in result.output


def test_validate_a_tabular_site_against_the_study(tmp_path: Path) -> None:
    site = write_tabular_sites(tmp_path, "gbsg2", sites=2, seed=1)[0]
    study = load_study_config(PROGNOSIS_STUDY)
    report = validate_site(site)
    assert report.valid and len(report.cases) == len(pd.read_csv(site / "clinical.csv"))
    assert validate_study_columns(site, study) == ([], [])
    frame = pd.read_csv(site / "clinical.csv")
    frame.loc[:2, "Tumour grade"] = "IV"  # a level the study does not know, in 3 rows
    frame["Recurrence/death"] = frame["Recurrence/death"].astype(object)
    frame.loc[5, "Recurrence/death"] = "yes"
    frame.loc[7:8, "Age (years)"] = np.nan
    frame.to_csv(site / "clinical.csv", index=False)
    problems, warns = validate_study_columns(site, study)
    text = " | ".join(str(p) for p in problems)
    assert "'Tumour grade'" in text and "3 row(s)" in text and "'Recurrence/death'" in text
    assert "IV" not in text and "yes" not in text.replace("analysis", "")  # counts, never a value
    assert any("'Age (years)'" in str(w) and "2 row(s)" in str(w) for w in warns)
    result = CliRunner().invoke(app, ["validate", str(site), "--study", str(PROGNOSIS_STUDY)])
    assert result.exit_code == 1 and "COLUMN INVALID" in result.output
    policy = yaml.safe_load((site / "site.yaml").read_text())
    del policy["policy"]["columns"]["Positive nodes"]
    (site / "site.yaml").write_text(yaml.safe_dump(policy))
    problems, _ = validate_study_columns(site, study)
    assert any("'Positive nodes' is not allowed as covariate" in str(p) for p in problems)
