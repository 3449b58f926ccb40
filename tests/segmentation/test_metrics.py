"""Segmentation metrics: per-case definitions, summaries, pooling, and `fedbiopsy compare-masks`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.errors import PolicyError
from common.segmentation.metrics import (
    METRICS,
    case_metrics,
    describe,
    pool_summaries,
    site_summary,
    unflatten,
)


def cube(shape: tuple[int, int, int], lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return m


def test_case_metrics_follow_the_seed_definitions() -> None:
    truth = cube((20, 20, 20), (5, 5, 5), (15, 15, 15))  # 1000 voxels
    pred = cube((20, 20, 20), (5, 5, 7), (15, 15, 17))  # shifted by 2 along x: TP 800, FP 200, FN 200
    m = case_metrics(truth, pred, spacing=(1.0, 1.0, 1.0))
    assert m["dsc"] == pytest.approx(2 * 800 / (2 * 800 + 200 + 200))
    assert m["fpr"] == pytest.approx(200 / 1000) and m["fnr"] == pytest.approx(200 / 1000)
    assert 0 < m["hd95"] <= 2.0 + 1e-6  # no surface point is further than the 2-voxel shift
    # Spacing scales HD95 (mm); a perfect probability map has AUC 1; the binary AUC is the balanced accuracy.
    assert case_metrics(truth, pred, spacing=(1.0, 1.0, 3.0))["hd95"] == pytest.approx(3 * m["hd95"])
    assert case_metrics(truth, truth, prob=truth * 0.9 + 0.05)["auc"] == 1.0
    tpr, tnr = 0.8, 1 - 200 / (8000 - 1000)
    assert m["auc"] == pytest.approx((tpr + tnr) / 2)
    empty = case_metrics(truth, np.zeros_like(truth))
    # an empty prediction: the worst HD95 (the grid's diagonal), never NaN (a model choosing empty predictions
    # would otherwise choose which cases an HD95 summary is over)
    assert empty["dsc"] == 0.0 and empty["fnr"] == 1.0
    assert empty["hd95"] == pytest.approx(math.sqrt(sum((n * 1.0) ** 2 for n in truth.shape)))


def test_pooled_summary_is_exact_for_mean_and_sd_and_weights_quartiles_by_cases() -> None:
    rng = np.random.default_rng(0)
    cases = {"A": [dict(zip(METRICS, rng.random(5), strict=True)) for _ in range(5)],
             "B": [dict(zip(METRICS, rng.random(5), strict=True)) for _ in range(9)]}
    flats = {s: site_summary(s, c, min_cohort=5) for s, c in cases.items()}
    pooled = pool_summaries(flats)
    all_dsc = [c["dsc"] for s in cases.values() for c in s]
    assert pooled["dsc"]["n"] == 14
    assert pooled["dsc"]["mean"] == pytest.approx(np.mean(all_dsc))
    assert pooled["dsc"]["sd"] == pytest.approx(np.std(all_dsc, ddof=1))
    expected_median = (5 * describe(c["dsc"] for c in cases["A"])["median"]
                       + 9 * describe(c["dsc"] for c in cases["B"])["median"]) / 14
    assert pooled["dsc"]["median"] == pytest.approx(expected_median)
    assert unflatten(flats["A"])["hd95"]["n"] == 5


def test_a_site_summary_holds_only_aggregates_and_refuses_small_cohorts() -> None:
    cases = [{"dsc": 0.9, "auc": 0.99, "fpr": 0.1, "fnr": 0.05, "hd95": 2.0}] * 4
    with pytest.raises(PolicyError, match="min_cohort"):
        site_summary("site-X", cases, min_cohort=5)
    flat = site_summary("site-X", cases + [cases[0]], min_cohort=5)
    # No per-case value: the reply is the case count plus 8 statistics of each metric.
    assert set(flat) == {"num-examples"} | {f"{m}-{s}" for m in METRICS
                                            for s in ("n", "sum", "sumsq", "median", "q25", "q75", "mean", "sd")}


def test_compare_masks_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    a, b = tmp_path / "rad1", tmp_path / "auto"
    a.mkdir()
    b.mkdir()
    truth = cube((20, 20, 20), (5, 5, 5), (15, 15, 15))
    for i, shift in enumerate((0, 1, 2)):
        sitk.WriteImage(sitk.GetImageFromArray(truth), str(a / f"case{i}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.roll(truth, shift, axis=2)), str(b / f"case{i}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(truth), str(a / "only_a.nii.gz"))
    out = tmp_path / "cmp.json"
    res = CliRunner().invoke(app, ["compare-masks", str(a), str(b), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "dsc" in res.output and "only_a" in res.output
    data = json.loads(out.read_text())
    dsc = sorted(c["dsc"] for c in data["per_case"].values())
    assert dsc == pytest.approx([0.8, 0.9, 1.0])  # shifts of 2, 1, 0 voxels on a 10-voxel cube
    assert data["summary"]["dsc"]["median"] == pytest.approx(0.9) and data["only_a"] == ["only_a"]
