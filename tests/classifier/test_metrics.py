"""Pooled metrics from site aggregates equal the metrics of the concatenated predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from common.classifier.evaluation import summarise_evaluation
from common.classifier.fairness import worst_group_gap
from common.classifier.metrics import (
    ScoreSummary,
    bin_index,
    confusion,
    metrics_of,
    parse_site_evaluation,
    pool,
    reliability,
    site_evaluation,
    with_ci,
)
from common.errors import PolicyError, ProtocolError

BINS = 20


def _predictions(seed: int, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.4).astype(int)
    s = 1.0 / (1.0 + np.exp(-(rng.normal(0, 1.2, n) + 1.5 * y - 0.5 + shift)))
    return s, y


SITES = {f"s{i}": _predictions(i, n, 0.3 * i) for i, n in enumerate((23, 41, 17))}


def test_pooled_auc_is_exact_for_the_shared_binning() -> None:
    aggs = [ScoreSummary.of(s, y, BINS) for s, y in SITES.values()]
    pooled = aggs[0] + aggs[1] + aggs[2]
    s_all = np.concatenate([s for s, _ in SITES.values()])
    y_all = np.concatenate([y for _, y in SITES.values()])
    m = metrics_of(pooled)
    assert m["auc"] == pytest.approx(roc_auc_score(y_all, bin_index(s_all, BINS)), abs=1e-12)
    # close to the raw-score AUC: only same-bin pairs of opposite class differ (each by at most 1/(2PN))
    assert abs(m["auc"] - roc_auc_score(y_all, s_all)) < 0.02
    pred = (s_all >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(float(np.mean(pred == y_all)), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(float(pred[y_all == 1].mean()), abs=1e-12)
    assert m["specificity"] == pytest.approx(float(1 - pred[y_all == 0].mean()), abs=1e-12)
    assert m["brier"] == pytest.approx(brier_score_loss(y_all, s_all), abs=1e-12)
    assert m["confidence"] == pytest.approx(float(np.maximum(s_all, 1 - s_all).mean()), abs=1e-12)
    assert confusion(pooled.counts)["tp"] == int(((pred == 1) & (y_all == 1)).sum())


def test_threshold_is_a_bin_edge_and_scores_on_it_count_positive() -> None:
    summary = ScoreSummary.of(np.array([0.5, 0.4999, 1.0, 0.0]), np.array([1, 0, 1, 0]), BINS)
    assert confusion(summary.counts) == {"tp": 2, "fn": 0, "fp": 0, "tn": 2}
    with pytest.raises(ValueError, match="even"):
        ScoreSummary.of(np.array([0.5]), np.array([1]), 7)


def test_reliability_is_exact() -> None:
    s, y = SITES["s1"]
    rel = reliability(ScoreSummary.of(s, y, BINS), 10)
    for lo, n, pred, obs in zip(rel["bin_low"], rel["n"], rel["predicted"], rel["observed"], strict=True):
        sel = (s >= lo) & (s < lo + 0.1) if lo < 0.9 else s >= lo
        assert n == sel.sum()
        if n:
            assert pred == pytest.approx(s[sel].mean(), abs=1e-12)
            assert obs == pytest.approx(y[sel].mean(), abs=1e-12)


def test_pooled_bootstrap_equals_stratified_bootstrap_of_concatenated_predictions() -> None:
    n_boot = 50
    replies = {site: site_evaluation(site, s, y, bins=BINS, n_boot=n_boot, seed=i, min_cohort=5)
               for i, (site, (s, y)) in enumerate(SITES.items())}
    pooled = pool(parse_site_evaluation(k, r, BINS) for k, r in replies.items())
    got = with_ci(pooled)
    # oracle: resample each site's predictions with the same generator draws, concatenate, compute raw metrics
    aucs = []
    draws = {site: np.random.default_rng(i) for i, site in enumerate(SITES)}
    for _ in range(n_boot):
        s_b, y_b = [], []
        for site, (s, y) in SITES.items():
            take = draws[site].integers(0, len(s), len(s))
            s_b.append(s[take])
            y_b.append(y[take])
        aucs.append(roc_auc_score(np.concatenate(y_b), bin_index(np.concatenate(s_b), BINS)))
    lo, hi = np.quantile(aucs, [0.025, 0.975])
    assert got["auc_lo"] == pytest.approx(lo, abs=1e-12)
    assert got["auc_hi"] == pytest.approx(hi, abs=1e-12)
    assert got["auc_lo"] < got["auc"] < got["auc_hi"]


def test_evaluation_reply_holds_no_case_level_array_and_small_sites_refuse() -> None:
    s, y = SITES["s0"]  # 23 cases
    reply = site_evaluation("s0", s, y, bins=BINS, n_boot=30, seed=0, min_cohort=5)
    for key, value in reply.items():
        arr = np.asarray(value)
        assert len(s) not in arr.shape, key  # nothing indexed by case
    assert int(np.asarray(reply["counts"]).sum()) == len(s)
    with pytest.raises(PolicyError, match="min_cohort"):
        site_evaluation("s0", s[:4], y[:4], bins=BINS, n_boot=10, seed=0, min_cohort=5)


def test_a_reply_with_another_binning_is_refused() -> None:
    s, y = SITES["s0"]
    reply = site_evaluation("s0", s, y, bins=10, n_boot=5, seed=0, min_cohort=5)
    with pytest.raises(ProtocolError, match="s0"):
        parse_site_evaluation("s0", reply, BINS)


def test_fairness_groups_and_worst_group_gap() -> None:
    replies = {site: site_evaluation(site, s, y, bins=BINS, n_boot=20, seed=i, min_cohort=5)
               for i, (site, (s, y)) in enumerate(SITES.items())}
    attrs = {"s0": {"vendor": "GE", "field_strength": "1.5"}, "s1": {"vendor": "GE", "field_strength": "3.0"},
             "s2": {"vendor": "Siemens", "field_strength": "3.0"}}
    out = summarise_evaluation(replies, attrs, bins=BINS, calibration_bins=10)
    ge = out["fairness"]["vendor"]["levels"]["GE"]
    s01 = np.concatenate([SITES["s0"][0], SITES["s1"][0]])
    y01 = np.concatenate([SITES["s0"][1], SITES["s1"][1]])
    assert ge["auc"] == pytest.approx(roc_auc_score(y01, bin_index(s01, BINS)), abs=1e-12)
    gap = out["fairness"]["site"]["worst_group_gap"]["auc"]
    per_site = {k: v["auc"] for k, v in out["per_site"].items()}
    assert gap["gap"] == pytest.approx(max(per_site.values()) - min(per_site.values()))
    assert gap["worst"] == min(per_site, key=per_site.get)
    brier = worst_group_gap({"a": {"brier": 0.1}, "b": {"brier": 0.3}})["brier"]
    assert brier["worst"] == "b" and brier["gap"] == pytest.approx(0.2)
