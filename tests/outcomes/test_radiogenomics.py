"""Federated radiogenomics (:mod:`common.radiogenomics`) against scipy on the pooled rows, and the site step on
simulated hospitals (whose ``tp53_mutation`` is drawn with a known association to the subtype)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from client.steps.radiogenomics import association_site
from common.config import load_study_config
from common.errors import PolicyError
from common.protocol import InMemoryQuery
from common.radiogenomics import RADIOGENOMICS_STEPS, AssociationSite, run_radiogenomics
from common.validation import load_site
from tests.outcomes.conftest import set_policy


def _sites(seed: int, min_cell: int = 1) -> tuple[dict[str, AssociationSite], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sites, xs, gs = {}, [], []
    for k, n in enumerate((23, 61, 9, 40)):
        g = (rng.random(n) < 0.4).astype(int)
        x = rng.normal(size=(n, 6)) * np.array([1, 2, 1, 5, 1, 1]) + k * 0.3  # a site shift
        x[:, 0] += 0.9 * g  # two features truly differ by group
        x[:, 3] -= 3.0 * g
        sites[f"site-{k}"] = AssociationSite(f"site-{k}", x, tuple(f"f{j}" for j in range(6)), g, min_cell=min_cell)
        xs.append(x)
        gs.append(g)
    return sites, np.concatenate(xs), np.concatenate(gs)


def test_association_table_equals_scipy_on_the_pooled_rows() -> None:
    sites, x, g = _sites(0)
    table = run_radiogenomics(InMemoryQuery(sites, RADIOGENOMICS_STEPS))
    ref = stats.ttest_ind(x[g == 1], x[g == 0], equal_var=False)
    assert np.abs(table.t - ref.statistic).max() < 1e-10
    assert np.abs(table.p - ref.pvalue).max() < 1e-12
    assert np.abs(table.df - ref.df).max() < 1e-8
    assert np.abs(table.q - stats.false_discovery_control(ref.pvalue, method="bh")).max() < 1e-12
    assert np.abs(table.difference - (x[g == 1].mean(0) - x[g == 0].mean(0))).max() < 1e-12
    rows = table.rows(0.05)
    assert {r["feature"] for r in rows if r["associated"]} == {"f0", "f3"}


def test_a_small_group_at_a_site_is_withheld_and_said_so() -> None:
    sites, x, g = _sites(1, min_cell=5)
    small = sites["site-2"]
    assert 0 < (small.groups == 1).sum() < 5 or 0 < (small.groups == 0).sum() < 5
    table = run_radiogenomics(InMemoryQuery(sites, RADIOGENOMICS_STEPS))
    assert table.withheld["site-2"]
    assert int(table.n.sum()) < g.size


def test_simulated_sites_find_the_subtype_features(signature_sites: list[Path], tmp_path: Path) -> None:
    study = load_study_config()
    sites = {p.name: association_site(load_site(p), study) for p in signature_sites}
    table = run_radiogenomics(InMemoryQuery(sites, RADIOGENOMICS_STEPS))
    pooled = pd.concat([pd.read_csv(p / "clinical.csv") for p in signature_sites])
    ct = pd.crosstab(pooled["subtype"], pooled["tp53_mutation"])
    assert stats.fisher_exact(ct.to_numpy())[1] < 0.05  # the simulated marker follows the subtype
    withheld = sum(len(v) for v in table.withheld.values())  # a site's group under min_cell (5) stays home
    assert min(table.q) < 0.05 and (int(table.n.sum()) == len(pooled)) == (withheld == 0)
    set_policy(signature_sites[0], columns={})  # a site that does not list the column refuses, naming the rule
    with pytest.raises(PolicyError, match="allowed_columns"):
        association_site(load_site(signature_sites[0]), study)


def test_a_release_over_fewer_patients_than_k_means_is_refused() -> None:
    """k-means' moments cover every patient with features; an association over all but one (no genomic value)
    would difference against them: the two releases share the ledger's ``features`` scope, and the site holds
    its answer (empty groups)."""
    from common.release_ledger import FEATURES, ReleaseLedger

    sites, _, _ = _sites(2, min_cell=5)
    site = sites["site-1"]
    ids = tuple(f"p{i}" for i in range(site.features.shape[0]))
    site.ledger, site.study_key = ReleaseLedger("site-1", None, 5), "study-a"
    site.ledger.release(FEATURES, list(ids), [list(ids)], "study-k")  # what kmeans_moments recorded
    site.features, site.groups, site.ids = site.features[1:], site.groups[1:], ids[1:]
    reply = RADIOGENOMICS_STEPS["association_moments"](site, {})
    assert reply["held"] == 1 and np.all(np.asarray(reply["n"]) == 0) and np.all(np.asarray(reply["mean"]) == 0)


@pytest.mark.slow
def test_the_phase_over_flower_writes_the_table(signature_sites: list[Path], tmp_path: Path) -> None:
    """The radiogenomics phase in Flower's simulation engine: the table equals scipy on the sites' pooled rows."""
    import json

    import yaml

    from simulations.engine import run_simulated_study

    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump({"name": "radiogenomics-test", "phases": ["radiogenomics"], "min_sites": 3}))
    run_simulated_study(load_study_config(study_path), study_path, signature_sites, tmp_path / "result")
    out = json.loads((tmp_path / "result" / "radiogenomics" / "association.json").read_text())
    assert (tmp_path / "result" / "radiogenomics" / "volcano.png").stat().st_size > 10_000
    answered = [p for p in signature_sites if not out["withheld_groups"][p.name]]  # a small group: none sent
    assert len(answered) >= 2
    scores = pd.concat([pd.read_csv(p / "derived" / "signature_scores.csv", dtype={"patient_id": str})
                        .set_index("patient_id") for p in answered])
    clinical = pd.concat([pd.read_csv(p / "clinical.csv", dtype={"patient_id": str}).set_index("patient_id")
                          for p in answered])
    g = clinical.loc[scores.index, "tp53_mutation"].to_numpy()
    for row in out["rows"]:
        x = pd.to_numeric(scores[row["feature"]]).to_numpy()
        ref = stats.ttest_ind(x[g == 1], x[g == 0], equal_var=False)
        assert abs(row["p"] - ref.pvalue) < 1e-10 and abs(row["t"] - ref.statistic) < 1e-8
    assert out["held"] == [] and out["associated"]
