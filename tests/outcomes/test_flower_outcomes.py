"""The outcomes phase through Flower's simulation engine: k-means and survival over simulated sites.

Two sites allow exact outcomes, one does not, so the phase must fall back to binned times with that
site's small cells merged; the server's curves, log-rank and Cox must still equal lifelines on the pooled
data as released by the sites.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test

from common.config import load_study_config
from common.survival import released_data
from common.validation import load_site
from simulations.engine import run_simulated_study
from tests.outcomes.conftest import set_policy


def test_outcomes_phase_over_flower(tmp_path: Path, signature_sites: list[Path]) -> None:
    set_policy(signature_sites[0], exact_outcomes=True)
    set_policy(signature_sites[1], exact_outcomes=True)  # site-003 keeps the default: binned, min_cohort 5
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump({"name": "outcomes-test", "phases": ["outcomes"], "min_sites": 3,
                                          "outcomes": {"k": 2, "time_bin_days": 14.0, "seed": 3}}))
    study = load_study_config(study_path)
    summary = run_simulated_study(study, study_path, signature_sites, tmp_path / "result")
    out = summary["outputs"]["outcomes"]
    assert out["mode"] == "binned" and out["kmeans"]["converged"]
    kinds = {Path(a["path"]).suffix: a for a in out["artifacts"]}
    assert set(kinds) == {".json", ".png"} and all(a["kind"] == "outcomes" for a in out["artifacts"])
    assert Path(kinds[".png"]["path"]).stat().st_size > 10_000
    assert kinds[".json"]["parent_kind"] == "signature"
    detail = json.loads(Path(kinds[".json"]["path"]).read_text())

    # the sites' released data, rebuilt here from what stayed at the sites (labels + clinical)
    parts = []
    for path in signature_sites:
        site = load_site(path)
        clusters = pd.read_csv(path / "derived" / "clusters.csv", dtype={"patient_id": str}).set_index("patient_id")
        clin = site.clinical_frame().loc[clusters.index]
        scores = pd.read_csv(path / "derived" / "signature_scores.csv", dtype={"patient_id": str}).set_index(
            "patient_id").loc[clusters.index, out["kmeans"]["features"]]
        z = (scores.to_numpy() - out["kmeans"]["feature_mean"]) / out["kmeans"]["feature_scale"]
        nearest = np.argmin(((z[:, None, :] - np.array(out["kmeans"]["centres"])[None]) ** 2).sum(2), axis=1)
        assert np.array_equal(nearest, clusters["cluster"].to_numpy())  # labels stayed at the site, and fit the centres
        policy = site.config.policy  # the study asks for 14-day bins; a site bins on its own grid (7 days)
        rel = released_data(site.site_id, clin["os_days"], clin["os_event"], clusters["cluster"],
                            time_bin_days=policy.time_bin_days, min_cell=policy.cell_floor)
        parts.append((rel.times, rel.events, rel.groups))
        assert summary["participants"]["outcomes"][site.site_id] == rel.times.size
    T, E, G = (np.concatenate(column) for column in zip(*parts, strict=True))
    assert np.allclose(T / 7.0, np.round(T / 7.0)) and not np.allclose(T / 14.0, np.round(T / 14.0))
    for g in sorted(set(G.tolist())):
        curve = detail["groups"][f"cluster_{g}"]
        ref = KaplanMeierFitter().fit(T[G == g], E[G == g])
        assert np.array_equal(curve["timeline"], ref.survival_function_.index.to_numpy())
        assert np.abs(np.array(curve["survival"]) - ref.survival_function_.iloc[:, 0].to_numpy()).max() < 1e-12
        assert np.abs(np.array([curve["ci_lower"], curve["ci_upper"]]).T - ref.confidence_interval_.to_numpy()).max() \
            < 1e-12
    assert abs(out["logrank"]["test_statistic"] - multivariate_logrank_test(T, G, E).test_statistic) < 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cph = CoxPHFitter().fit(pd.DataFrame({"T": T, "E": E, "cluster_1": (G == 1).astype(float)}), "T", "E")
    assert abs(out["cox"]["covariates"]["cluster_1"]["coef"] - cph.params_["cluster_1"]) < 1e-6
    assert abs(out["cox"]["covariates"]["cluster_1"]["se"] - cph.standard_errors_["cluster_1"]) < 1e-6
