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
from tests.security.curious import LeakIndex, read_replies, reply_recorder

STUDY = """
name: golden-e2e
phases: [fingerprint, preprocessing, segmentation, inference, features, harmonisation, reduction, classifier,
         outcomes, report]
min_sites: 2
round_timeout_s: 900
fingerprint: {foreground_samples_per_case: 2000}
preprocessing: {steps: [bias, resample, normalise]}
segmentation: {rounds: 3, steps_per_epoch: 20, lr: 0.01, patch_size: [24, 24, 24], holdout_fraction: 0.5,
               overlays: 1, threads: 1, monai_channels: [8, 16, 32]}
reduction: {n_factors: 3}
classifier: {models: [logistic, image], rounds: 60, image_rounds: 1, image_local_steps: 2, holdout_fraction: 0.45,
             bootstrap: 50, crop_size: 12}
"""


@pytest.fixture(scope="module")
def study_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict]:
    """The whole study; every reply of every node is recorded under ``results/replies`` (its fields, and the
    leak checker's findings against the node's site)."""
    from simulations.engine import run_simulated_study

    root = tmp_path_factory.mktemp("golden")
    sites = simulate_sites(root / "sites", sites=2, patients=14, size=32, seed=0, unlabelled=2, raters=3)
    study_path = root / "study.yaml"
    study_path.write_text(STUDY)
    summary = run_simulated_study(load_study_config(study_path), study_path, sites, root / "results" / "study",
                                  mods=[reply_recorder(root / "results" / "replies")])
    return root / "results", sites, summary


def test_every_phase_wrote_its_output(study_run) -> None:
    results, _, summary = study_run
    for phase in summary["phases"]:
        assert (results / "study" / f"{phase}.json").is_file(), phase
    assert summary["outputs"]["fingerprint"]["cases_per_site"] == {"site-001": 12, "site-002": 12}
    inference = summary["outputs"]["inference"]
    features = summary["outputs"]["features"]
    for site in ("site-001", "site-002"):
        # the 2 unlabelled cases per site, segmented or found tumour-free: under the default policy (cells of at
        # least 5) counts of a group of cases under 5 leave the site as "<5", zeros included (a 0 next to a "<5"
        # would say that every unlabelled case went one way)
        assert (inference["segmented_per_site"][site], inference["empty_per_site"][site]) == ("<5", "<5")
        # every valid case (14) is extracted or failed; a small number of failures leaves as "<5"
        failed = features["failed_per_site"][site]
        assert failed in (0, "<5") and (failed == "<5") == (features["cases_per_site"][site] < 14)
        assert 10 <= features["cases_per_site"][site] <= 14


def test_segmentation_learnt_something(study_run) -> None:
    seg = study_run[2]["outputs"]["segmentation"]
    assert seg["final_dsc_median"] > seg["initial_dsc_median"]
    # a random network's DSC on these tumours is ~0.01; under the default policy a site's "median" is the mean of
    # the 5 held-out cases around it (never one case's value), which on these few short-trained cases is ~0.045
    assert seg["final_dsc_median"] > 0.03


def test_the_imaging_phases_ran_on_the_preprocessed_cases_on_the_plans_grid(study_run) -> None:
    """One chain: segmentation, inference, radiomics and the classifier read derived/preprocessed/ on the plan's
    target grid, and say so; the radiomics of a case are those of its preprocessed image."""
    import SimpleITK as sitk

    from client.steps.inputs import load_imaging_inputs
    from common.imageio import read_image
    from common.validation import load_site

    results, sites, summary = study_run
    outputs = summary["outputs"]
    plan = json.loads((results / "study" / "plan.json").read_text())
    for phase in ("segmentation", "inference", "features", "classifier"):
        assert outputs[phase]["inputs"] == "preprocessed", phase
        assert outputs[phase]["grid_spacing"] == pytest.approx(plan["target_spacing"]), phase
    seg_plan = json.loads(Path(outputs["segmentation"]["plan"]).read_text())
    assert seg_plan["target_spacing"][::-1] == pytest.approx(plan["target_spacing"])
    study = load_study_config(results.parent / "study.yaml")
    for site_dir in sites:
        sidecar = json.loads((site_dir / "derived" / "features.json").read_text())
        inputs = load_imaging_inputs(load_site(site_dir), study)
        assert sidecar["inputs"] == "preprocessed" and sidecar["plan_sha256"] == inputs.plan_sha256
        frame = pd.read_csv(site_dir / "derived" / "features.csv", dtype={"patient_id": str}).set_index("patient_id")
        case = next(c for c in inputs.site.cases if c.mask is not None and c.patient_id in frame.index)
        mask = sitk.GetArrayFromImage(read_image(case.mask)) > 0
        for seq in ("T2w", "CET1"):
            mean = sitk.GetArrayFromImage(read_image(case.images[seq]))[mask].mean()
            assert frame.loc[case.patient_id, f"{seq}_original_firstorder_Mean"] == pytest.approx(mean, rel=1e-5)


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



STUDY_MESSAGE_TYPES = {  # what the default study's phases send (not rollcall, combat_batch, classifier_nyul)
    "query.fingerprint", "query.nyul_landmarks", "query.preprocessing_plan", "query.preprocessing_apply",
    "query.segmentation_cohort", "train.segmentation", "evaluate.segmentation", "query.segment_unlabelled",
    "query.segmentation_study",
    "query.features", "query.combat_summary", "query.combat_fit", "query.combat_var", "query.combat_apply",
    "query.featurestats", "query.signature_scores", "query.classifier_moments", "train.classifier",
    "evaluate.classifier", "query.kmeans_moments", "query.kmeans_local_centres", "query.kmeans_assign",
    "query.kmeans_labels", "query.survival_table", "query.cox_moments", "query.cox_sums", "query.feature_moments",
}


@pytest.fixture(scope="module")
def replies(study_run) -> list[dict]:
    records = read_replies(study_run[0] / "replies")
    assert records, "the reply recorder wrote nothing"
    assert [r for r in records if "recorder_failed" in r] == []
    return records


def test_every_action_of_the_study_was_answered_by_both_sites(replies) -> None:
    from client.steps import SITE_STEPS
    from common.protocol import message_type

    assert STUDY_MESSAGE_TYPES <= {message_type(a) for a in SITE_STEPS}
    assert {r["type"] for r in replies} == STUDY_MESSAGE_TYPES
    assert [r for r in replies if r["error"]] == []  # an honest study is never refused
    for kind in STUDY_MESSAGE_TYPES:
        assert len({r["node"] for r in replies if r["type"] == kind}) == 2, kind


def test_no_reply_holds_a_patient_level_value(study_run, replies) -> None:
    """No id, site path, exception text or exact feature/score cell (or clinical value) in any reply; the same
    checker finds each of those planted in a reply, and no honest count or size."""
    found = [f"{r['type']}: {line}" for r in replies for line in r["leaks"]]
    assert found == []
    site = study_run[1][0]
    features = pd.read_csv(site / "derived" / "features.csv", index_col=0)
    scores = pd.read_csv(site / "derived" / "signature_scores.csv", index_col=0)
    planted = {"note": f"case {features.index[3]} done", "where": f"{site.resolve()}/derived",
               "cells": np.array([0.0, features.iloc[2, 5]]), "score": float(scores.iloc[1, 0]),
               "text": f"mean {float(features.iloc[4, 7])!r}"}
    assert len(LeakIndex([site]).scan(planted)) == 5
    honest = {"n": 14, "counts": np.arange(64.0), "sizes": [32, 32, 32], "spacing": np.array([1.0, 1.5, 0.5]),
              "hist": np.bincount(np.arange(50) % 7).astype(float), "weights": np.full(10, 0.25, np.float32)}
    assert LeakIndex([site]).scan(honest) == []


def test_every_reply_field_is_in_the_reviewed_inventory(replies) -> None:
    """A field a step adds later fails here until it is reviewed in tests/security/replies_allowlist.py."""
    from fnmatch import fnmatchcase

    from tests.security.replies_allowlist import CONDITIONAL, FLAGGED, REVIEWED

    unreviewed = set()
    for r in replies:
        patterns = [*REVIEWED.get(r["type"], {}), *FLAGGED.get(r["type"], {})]
        unreviewed |= {(r["type"], f) for f in r["fields"] if not any(fnmatchcase(f, p) for p in patterns)}
    assert sorted(unreviewed) == []
    seen = {(r["type"], f) for r in replies for f in r["fields"]}
    stale = {(t, p) for lists in (REVIEWED, FLAGGED) for t, fields in lists.items() for p in fields
             if not any(t == k and fnmatchcase(f, p) for k, f in seen)} - CONDITIONAL
    assert sorted(stale) == []  # the inventory lists what the study sends, no more
