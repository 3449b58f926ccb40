"""The golden end-to-end test: the whole virtual-biopsy study over 2 tiny simulated hospitals, through
Flower's simulation engine, each phase's output checked for existence and sanity, the report rendered in
headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.config import load_study_config
from server.phases.report import SECTIONS
from server.registry import open_registry
from simulations.phantoms import simulate_sites
from tests.harmonisation.oracle import max_rel_diff, pooled_neurocombat

STUDY = """
name: golden-e2e
phases: [fingerprint, preprocessing, segmentation, inference, features, harmonisation, reduction, classifier,
         outcomes, report]
min_sites: 2
round_timeout_s: 900
fingerprint: {foreground_samples_per_case: 2000}
preprocessing: {steps: [bias, resample, normalise]}
segmentation: {rounds: 3, steps_per_epoch: 10, patch_size: [24, 24, 24], holdout_fraction: 0.5, overlays: 1,
               threads: 1, monai_channels: [8, 16, 32]}
reduction: {n_factors: 3}
classifier: {models: [logistic, image], rounds: 60, image_rounds: 1, image_local_steps: 2, holdout_fraction: 0.45,
             bootstrap: 50, crop_size: 12}
"""


@pytest.fixture(scope="module")
def study_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict]:
    from simulations.engine import run_simulated_study

    root = tmp_path_factory.mktemp("golden")
    sites = simulate_sites(root / "sites", sites=2, patients=14, size=32, seed=0, unlabelled=2)
    study_path = root / "study.yaml"
    study_path.write_text(STUDY)
    summary = run_simulated_study(load_study_config(study_path), study_path, sites, root / "results" / "study")
    return root / "results", sites, summary


def test_every_phase_wrote_its_output(study_run) -> None:
    results, _, summary = study_run
    for phase in summary["phases"]:
        assert (results / "study" / f"{phase}.json").is_file(), phase
    assert summary["outputs"]["fingerprint"]["cases_per_site"] == {"site-001": 12, "site-002": 12}
    inference = summary["outputs"]["inference"]
    for site in ("site-001", "site-002"):  # the 2 unlabelled cases per site: segmented, or found tumour-free
        assert inference["segmented_per_site"][site] + inference["empty_per_site"][site] == 2
        features = summary["outputs"]["features"]  # every valid case is extracted or listed as failed
        assert features["cases_per_site"][site] + features["failed_per_site"][site] == 14
        assert features["failed_per_site"][site] >= inference["empty_per_site"][site]  # no mask: no features


def test_segmentation_learnt_something(study_run) -> None:
    seg = study_run[2]["outputs"]["segmentation"]
    assert seg["final_dsc_median"] > seg["initial_dsc_median"]
    assert seg["final_dsc_median"] > 0.05  # a random network's DSC on these tumours is ~0.01


def test_combat_parity_with_pooled_neurocombat(study_run) -> None:
    _, sites, _ = study_run
    from client.features.table import read_feature_table

    raw = {s.name: read_feature_table(s / "derived" / "features.csv") for s in sites}
    harmonised = pd.concat([read_feature_table(s / "derived" / "features_harmonised.csv") for s in sites])
    expected, _ = pooled_neurocombat(raw)
    assert max_rel_diff(harmonised.loc[expected.index, expected.columns], expected, pd.concat(raw.values())) < 1e-8


def test_kaplan_meier_curves_are_monotone_and_logrank_is_sane(study_run) -> None:
    results, _, summary = study_run
    out = json.loads((results / "study" / "outcomes" / "outcomes_summary.json").read_text())
    assert set(out["groups"]) == {"cluster_0", "cluster_1"}
    for group in out["groups"].values():
        s = np.asarray(group["survival"])
        assert s[0] <= 1.0 and np.all(np.diff(s) <= 1e-12) and np.all(s >= 0)
        assert np.all(np.diff(group["timeline"]) > 0)
    assert 0.0 <= summary["outputs"]["outcomes"]["logrank"]["p_value"] <= 1.0


def test_registry_verifies_and_holds_the_lineage(study_run) -> None:
    results, _, _ = study_run
    with open_registry(results / "registry", create=False) as registry:
        report = registry.verify()
        assert report.ok, report.first
        kinds = {v.kind for v in registry.versions()}
        assert {"plan", "segmentation", "harmonisation", "signature", "classifier", "outcomes"} <= kinds
        final_classifier = registry.versions(kind="classifier")[-1]
        assert {s.site_id for s in final_classifier.sites} == {"site-001", "site-002"}


def test_report_has_every_section_and_every_figure_loads_in_chromium(study_run) -> None:
    results, _, _ = study_run
    report = results / "study" / "report.html"
    html = report.read_text()
    assert re.findall(r'data-section="([a-z]+)"', html) == [sid for sid, _ in SECTIONS]
    assert "could not be built" not in html and "Figure missing" not in html
    assert "This phase did not run" not in html
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("headless Chromium is needed to check the report: install Debian's `chromium` (make test does)")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={results / 'chromium-profile'}", "--virtual-time-budget=10000", "--dump-dom",
         report.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r'<body data-figures="(\d+)" data-figures-loaded="(\d+)"', dom)
    assert body is not None, dom[:500]
    figures, loaded = map(int, body.groups())
    assert figures >= 6 and loaded == figures
