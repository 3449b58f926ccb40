"""The seed's segmentation study, federated (common/segmentation/study.py): the merged tables against the pooled
computation over the same cases, the simulated raters' disagreement, and what a reply may hold."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.imageio import read_image
from common.protocol import InMemoryQuery
from common.segmentation.metrics import METRICS, case_metrics
from common.segmentation.study import (
    SEGMENTATION_STUDY,
    merge_study,
    run_segmentation_study,
    seed_rows,
    study_request,
)
from common.sitedata import rater_masks
from common.validation import load_site
from tests.segmentation.conftest import set_policy, tiny_study
from tests.segmentation.test_federated_run import AGGREGATE as AGGREGATE_FINGERPRINT


@pytest.fixture(scope="module")
def rated_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two sites of 12 patients, every one outlined by 3 raters; 5 held out each (holdout 0.4)."""
    from simulations.phantoms import simulate_sites

    return simulate_sites(tmp_path_factory.mktemp("rated"), sites=2, patients=12, size=32, seed=5, raters=3)


@pytest.fixture(scope="module")
def model(rated_sites: list[Path]) -> tuple[dict, dict]:
    """A plan and a briefly trained model (one site, 40 steps): masks that overlap the tumours, imperfectly."""
    from client.segmentation.task import train_round
    from common.segmentation.networks import build_network, get_weights
    from common.segmentation.plan import make_plan

    study = tiny_study(steps_per_epoch=40, holdout_fraction=0.4)
    plan = make_plan(AGGREGATE_FINGERPRINT, study)
    out = train_round(load_site(rated_sites[0]), study, plan, get_weights(build_network(plan, seed=0)), 1)
    return plan, out.weights


@pytest.fixture(autouse=True)
def fresh_ledgers(rated_sites: list[Path]) -> None:
    """Each test starts from sites whose release ledgers hold nothing (the sets of earlier tests' studies)."""
    for d in rated_sites:
        (d / "derived" / "release-ledger.json").unlink(missing_ok=True)


def _query(site_dirs: list[Path], study) -> InMemoryQuery:  # noqa: ANN001
    from client.steps.segmentation_study import STEPS

    sites = {s.site_id: s for s in map(load_site, site_dirs)}
    return InMemoryQuery(sites, {SEGMENTATION_STUDY: lambda site, payload: STEPS[SEGMENTATION_STUDY].run(
        site, study, payload)})


def _pooled_rows(site_dirs: list[Path], study, plan: dict, weights: dict) -> tuple[list, list]:  # noqa: ANN001
    """The oracle: every case's values computed here, over all sites' files pooled (a simulation can)."""
    from client.segmentation.data import load_volume, split_cases
    from client.segmentation.inference import predict_probability
    from client.steps.inference import native_probability
    from common.segmentation.networks import build_network, set_weights

    net = build_network(plan)
    set_weights(net, weights)
    inter, auto = [], []
    for d in site_dirs:
        site = load_site(d)
        _, held = split_cases(site.cases, study.segmentation.holdout_fraction, study.segmentation.seed)
        for case in site.cases:
            masks = [sitk.GetArrayFromImage(read_image(p)) > 0
                     for p in [case.mask, *rater_masks(d, case.patient_id).values()]]
            spacing = tuple(reversed(read_image(case.mask).GetSpacing()))
            pairs = [case_metrics(a, b, None, spacing) for a, b in combinations(masks, 2)]
            inter.append({m: np.nanmean([p[m] for p in pairs]) for m in METRICS})
            if case in held:
                ref = read_image(case.images["T2w"])
                prob = predict_probability(net, load_volume(case, plan["sequences"]).image, plan["patch_size"], "cpu",
                                           mirror=study.segmentation.mirror)
                score = native_probability(prob, ref, ref)
                rows = [case_metrics(m, score > 0.5, score, spacing) for m in masks]
                auto.append({m: np.nanmean([r[m] for r in rows]) for m in METRICS})
    return inter, auto


def test_simulated_raters_disagree_like_radiologists(rated_sites: list[Path]) -> None:
    """Rater vs rater DSC around the seed's 0.969 (boundary moves of about half a voxel, a few islands)."""
    dsc = []
    for d in rated_sites:
        for case in load_site(d).cases:
            raters = rater_masks(d, case.patient_id)
            assert sorted(raters) == ["rater2", "rater3"]
            masks = [sitk.GetArrayFromImage(read_image(p)) > 0 for p in [case.mask, *raters.values()]]
            dsc += [2 * (a & b).sum() / (a.sum() + b.sum()) for a, b in combinations(masks, 2)]
    assert 0.90 < float(np.median(dsc)) < 0.99 and min(dsc) < 0.95  # not identical, not unrelated


def test_the_merged_tables_equal_the_pooled_computation(rated_sites: list[Path], model: tuple[dict, dict],
                                                        tmp_path: Path) -> None:
    plan, weights = model
    study = tiny_study(holdout_fraction=0.4, overlays=1)
    for d in rated_sites:
        set_policy(d, min_cohort=5, exact_outcomes=True)  # cell floor 1: the sites' quartiles are numpy's
    try:
        result = run_segmentation_study(_query(rated_sites, study), weights, plan)
    finally:
        for d in rated_sites:
            set_policy(d, min_cohort=5, exact_outcomes=False)
    inter, auto = _pooled_rows(rated_sites, study, plan, weights)
    assert len(inter) == 24 and len(auto) == 10
    for name, rows in (("inter", inter), ("auto", auto)):
        merged = result.tables[name]
        assert merged is not None and result.sites[name] == ["site-001", "site-002"]
        for metric in METRICS:
            values = np.asarray([r[metric] for r in rows], dtype=np.float64)
            values = values[np.isfinite(values)]
            got = merged[metric]
            assert got["n"] == values.size, (name, metric)
            assert got["mean"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-12), (name, metric)
            assert got["sd"] == pytest.approx(values.std(ddof=1), rel=1e-6, abs=1e-9), (name, metric)
            # median and IQR: the case-weighted mean of each site's numpy quartiles (quantiles do not decompose)
            halves = np.array_split(np.asarray([r[metric] for r in rows]), 2)
            expected = np.mean([np.nanpercentile(h, 50) for h in halves])
            assert got["median"] == pytest.approx(expected, rel=1e-9), (name, metric)
    assert 0.85 < result.tables["inter"]["dsc"]["median"] < 0.99
    assert result.tables["auto"]["dsc"]["mean"] > 0.3  # a model that learnt something, scored on unseen cases
    assert result.timed_cases == 10 and result.model_seconds_per_case and result.leverage(1200.0) > 10
    rows = seed_rows(result.tables["auto"])
    assert [r["statistic"] for r in rows] == ["Median", "IQR", "Mean", "SD"]
    assert rows[0]["1-FPR"] == pytest.approx(1 - result.tables["auto"]["fpr"]["median"])
    # the mask comparison images stay at the site
    images = list((rated_sites[0] / "derived" / "segmentation").glob(f"comparison-{study.hash[:12]}/*.png"))
    assert len(images) == 1


def test_a_reply_holds_summaries_over_cells_of_cases_never_a_case(rated_sites: list[Path],
                                                                   model: tuple[dict, dict]) -> None:
    """Under the default policy (min_cohort 5 = cell floor) a site's 5 held-out cases give one mean for every
    quartile of the automatic table, and no released number is one case's value."""
    plan, weights = model
    study = tiny_study(holdout_fraction=0.4, overlays=0)
    query = _query(rated_sites, study)
    replies = query(SEGMENTATION_STUDY, study_request(weights, plan))
    inter, auto = _pooled_rows(rated_sites[:1], study, plan, weights)
    reply = replies["site-001"]
    for metric in ("dsc", "auc"):
        per_case = [r[metric] for r in auto]
        assert reply[f"auto/{metric}-median"] == reply[f"auto/{metric}-q25"] == pytest.approx(np.mean(per_case))
        assert all(abs(reply[f"auto/{metric}-median"] - v) > 1e-9 for v in per_case)
    keys = {k.split("/")[0] for k in reply}
    assert keys <= {"inter", "auto", "model_seconds_sum", "model_cases"}
    assert merge_study(replies).tables["auto"]["dsc"]["n"] == 10


def test_a_site_with_too_few_rated_cases_withholds_the_table(rated_sites: list[Path], model: tuple[dict, dict]
                                                             ) -> None:
    plan, weights = model
    study = tiny_study(holdout_fraction=0.4, overlays=0)
    set_policy(rated_sites[1], min_cohort=6)  # 5 held-out cases: the automatic table is withheld there
    try:
        result = run_segmentation_study(_query(rated_sites, study), weights, plan)
    finally:
        set_policy(rated_sites[1], min_cohort=5)
    assert result.sites == {"inter": ["site-001", "site-002"], "auto": ["site-001"]}
    assert result.tables["auto"]["dsc"]["n"] == 5 and result.timed_cases == 5


def test_two_studies_cannot_difference_the_automatic_table_into_one_case(rated_sites: list[Path],
                                                                        model: tuple[dict, dict]) -> None:
    """The server picks the held-out fraction: 0.4 holds out 5 rated cases, 0.5 the same 5 and one more. Without
    the release ledger (a policy allowing exact outcomes) the two tables' DSC sums give that one case's DSC
    exactly; under the default policy the second study is refused (rule release_ledger)."""
    from common.errors import PolicyError

    plan, weights = model
    site_dir = rated_sites[0]
    first, second = tiny_study(holdout_fraction=0.4, overlays=0), tiny_study(holdout_fraction=0.5, overlays=0)
    step = __import__("client.steps.segmentation_study", fromlist=["STEPS"]).STEPS[SEGMENTATION_STUDY]
    request = study_request(weights, plan)
    set_policy(site_dir, min_cohort=5, exact_outcomes=True)  # no ledger: the attack works
    try:
        a = step.run(load_site(site_dir), first, dict(request))
        b = step.run(load_site(site_dir), second, dict(request))
    finally:
        set_policy(site_dir, min_cohort=5, exact_outcomes=False)
    assert not (site_dir / "derived" / "release-ledger.json").exists()
    assert (a["auto/dsc-n"], b["auto/dsc-n"]) == (5, 6)
    _, auto_first = _pooled_rows([site_dir], first, plan, weights)
    _, auto_second = _pooled_rows([site_dir], second, plan, weights)
    extra = [r["dsc"] for r in auto_second if all(abs(r["dsc"] - q["dsc"]) > 1e-12 for q in auto_first)]
    assert len(extra) == 1 and b["auto/dsc-sum"] - a["auto/dsc-sum"] == pytest.approx(extra[0], abs=1e-9)

    step.run(load_site(site_dir), first, dict(request))  # the default policy: the first study's set is recorded
    with pytest.raises(PolicyError) as refused:
        step.run(load_site(site_dir), second, dict(request))
    assert refused.value.rule == "release_ledger"


def test_a_study_asks_once_and_a_new_rater_cannot_difference_the_inter_table(rated_sites: list[Path],
                                                                             model: tuple[dict, dict]) -> None:
    """Another model scored on the same held-out cases in the same study is refused (the same request again is a
    rerun). A radiologist outlining one more case changes the inter-observer sums by that case's values: without
    the ledger the difference is exactly its metrics; with it the second study's inter table is withheld."""
    import shutil

    from common.errors import PolicyError

    plan, weights = model
    site_dir = rated_sites[0]
    step = __import__("client.steps.segmentation_study", fromlist=["STEPS"]).STEPS[SEGMENTATION_STUDY]
    study = tiny_study(holdout_fraction=0.4, overlays=0)
    step.run(load_site(site_dir), study, study_request(weights, plan))
    step.run(load_site(site_dir), study, study_request(weights, plan))  # a rerun: the same answer may leave
    other = {k: v + np.float32(0.01) for k, v in weights.items()}
    with pytest.raises(PolicyError) as refused:
        step.run(load_site(site_dir), study, study_request(other, plan))
    assert refused.value.rule == "release_ledger"

    case = load_site(site_dir).cases[0].patient_id
    aside = site_dir.parent / "raters-aside"
    shutil.move(site_dir / "raters" / case, aside)  # before: one case fewer has further raters
    try:
        set_policy(site_dir, min_cohort=5, exact_outcomes=True)
        before = step.run(load_site(site_dir), tiny_study(seed=1), study_request(weights, plan))
    finally:
        shutil.move(aside, site_dir / "raters" / case)
    try:
        after = step.run(load_site(site_dir), tiny_study(seed=2), study_request(weights, plan))
    finally:
        set_policy(site_dir, min_cohort=5, exact_outcomes=False)
    inter, _ = _pooled_rows([site_dir], study, plan, weights)
    one = inter[0]  # the case whose raters came back (site.cases order)
    assert after["inter/dsc-sum"] - before["inter/dsc-sum"] == pytest.approx(one["dsc"], abs=1e-9)

    (site_dir / "derived" / "release-ledger.json").unlink(missing_ok=True)
    shutil.move(site_dir / "raters" / case, aside)
    try:
        first = step.run(load_site(site_dir), tiny_study(seed=1), study_request(weights, plan))
    finally:
        shutil.move(aside, site_dir / "raters" / case)
    second = step.run(load_site(site_dir), tiny_study(seed=2), study_request(weights, plan))
    assert "inter/withheld" not in first and second["inter/withheld"] == 1.0
