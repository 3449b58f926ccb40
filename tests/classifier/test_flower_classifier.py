"""The classifier phase through Flower's simulation engine: the same numbers as the same driver in memory."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from common.config import load_study_config

STUDY = """name: classifier-flower
phases: [classifier]
min_sites: 3
round_timeout_s: 300
classifier:
  models: [logistic, image]
  features: compact
  rounds: 8
  lr: 1.0
  l2: 0.05
  bootstrap: 30
  image_rounds: 2
  image_local_steps: 3
  crop_size: 12
  gradcam_overlays: 2
"""


def test_classifier_phase_through_flower(tmp_path) -> None:
    from client.classifier.data import site_labels
    from client.classifier.memory import CLASSIFIER_STEPS, feature_site_arrays, memory_sites
    from common.classifier.protocol import run_classifier
    from common.protocol import InMemoryQuery
    from common.validation import load_site
    from simulations.engine import run_simulated_study
    from simulations.harmonisation_sites import simulate_experiment_sites

    site_dirs = simulate_experiment_sites(tmp_path / "sites", sites=3, patients=18, size=32, seed=3)
    study_path = tmp_path / "study.yaml"
    study_path.write_text(STUDY)
    study = load_study_config(study_path)

    summary = run_simulated_study(study, study_path, site_dirs, tmp_path / "out")

    out = summary["outputs"]["classifier"]
    assert set(summary["participants"]["classifier"]) == {"site-001", "site-002", "site-003"}
    assert all(n == 18 for n in summary["participants"]["classifier"].values())
    kinds = [a["kind"] for a in out["artifacts"]]
    assert kinds == ["classifier", "classifier"]
    assert set(out["feature_sources"].values()) == {"compact"} and "parent_kind" not in out["artifacts"][0]
    logistic = out["models"]["logistic"]
    assert not logistic["errors"] and all(not h["rejected"] for h in logistic["history"])
    metrics = out["artifacts"][0]["metrics"]
    assert set(metrics) == {"site-001", "site-002", "site-003", "pooled"}
    assert {"auc", "accuracy", "sensitivity", "specificity", "brier", "auc_lo", "auc_hi"} <= set(metrics["pooled"])
    fairness = logistic["summary"]["fairness"]
    assert set(fairness["field_strength"]["levels"]) == {"1.5T", "3T"}
    assert set(fairness["vendor"]["levels"]) == {"Siemens", "GE", "Philips"}
    assert "auc" in fairness["site"]["worst_group_gap"]
    # the federated mean |SHAP| covers every feature
    assert len(logistic["summary"]["shap"]["features"]) == len(out["feature_names"]) == 30

    # the same driver over the same site functions in memory gives the same model and the same figures
    sites = [load_site(d) for d in site_dirs]
    feats = {}
    for s in sites:
        (cache,) = sorted((s.root / "derived" / "classifier").glob("compact-*.csv"))
        feats[s.site_id] = pd.read_csv(cache, dtype={"patient_id": str}).set_index("patient_id")
    labels = {s.site_id: site_labels(s, "label") for s in sites}
    clinical = {s.site_id: s.clinical_frame() for s in sites}
    arrays = feature_site_arrays(feats, labels, study.classifier, clinical)
    local = run_classifier(InMemoryQuery(memory_sites(arrays, study.classifier), CLASSIFIER_STEPS), "logistic",
                           study.classifier)
    assert local.scaling.names == out["feature_names"]
    with np.load(out["artifacts"][0]["path"]) as saved:
        np.testing.assert_allclose(saved["0.weight"], local.weights["0.weight"], rtol=0, atol=1e-12)
    assert metrics["pooled"]["auc"] == pytest.approx(local.summary["pooled"]["auc"], abs=1e-12)
    assert metrics["pooled"]["auc_lo"] == pytest.approx(local.summary["pooled"]["auc_lo"], abs=1e-12)

    # the image model: Grad-CAM statistics came back, overlays stayed at the sites
    image = out["models"]["image"]["summary"]
    assert image["gradcam"]["n"] == sum(int(m["n"]) for m in image["per_site"].values())
    for s in sites:
        pngs = list((s.root / "derived" / "classifier").glob("gradcam-*/*.png"))
        assert len(pngs) == 2
    files = json.loads((tmp_path / "out" / "classifier" / "summary.json").read_text())
    assert files["comparison"][0]["model"] == "logistic" and files["comparison"][0]["most_relevant"]
    assert (tmp_path / "out" / "classifier" / "metrics.csv").is_file()
    assert (tmp_path / "out" / "classifier" / "logistic-shap.png").is_file()
