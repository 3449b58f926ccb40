"""Statistics replies that used to carry one patient's value (issue 14): classifier evaluation, fingerprint,
preprocessing histograms, inference counts.

Each attack is a small curious "server" calling the site function in-process with inputs it chose. It recovers
the exact value from the old code path (the same function with an exact-outcomes policy, which keeps today's
behaviour) and nothing from the site's default policy.
"""

from __future__ import annotations

import numpy as np
import pytest

from client.classifier.site import evaluate_reply
from common.classifier.models import build_feature_model, feature_scores, load_weights, model_weights
from common.config import ClassifierConfig
from common.errors import PolicyError
from common.hashing import derive_seed
from common.sitedata import SitePolicy

DEFAULT = SitePolicy()  # min_cohort 5, cell_floor 5, histogram_bins 64
OLD = SitePolicy(exact_outcomes=True, histogram_bins=10_000)  # the unguarded reply of today (cell_floor 1)
N = 9
SITE = "site-x"


def _held_out(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.uniform(-2.0, 2.0, N), rng.normal(size=N)])
    return x, (rng.uniform(size=N) < 0.5).astype(np.int64)


def _crafted(a: float, b: float) -> dict[str, np.ndarray]:
    """A logistic model whose score is sigmoid(a * x0 + b): it reads feature 0 only."""
    w = model_weights(build_feature_model("logistic", 2))
    w["0.weight"] = np.array([[a, 0.0]], dtype=np.float64)
    w["0.bias"] = np.array([b], dtype=np.float64)
    return w


def _payload(weights: dict[str, np.ndarray]) -> dict[str, object]:
    return {"model": "logistic", "x_mean": np.zeros(2), "x_scale": np.ones(2),
            **{f"w/{k}": v for k, v in weights.items()}}


def _cfg(bins: int, bootstrap: int = 0) -> ClassifierConfig:
    return ClassifierConfig(score_bins=bins, calibration_bins=2, bootstrap=bootstrap, shap=False)


def _logit_x0(p: float, a: float = 1.0, b: float = 0.0) -> float:
    return float((np.log(p / (1.0 - p)) - b) / a)


def _scores(x: np.ndarray, a: float = 1.0, b: float = 0.0) -> np.ndarray:
    """The site's own scores of the crafted model (the oracle of what a bin's psum holds)."""
    net = build_feature_model("logistic", 2)
    load_weights(net, _crafted(a, b), SITE)
    return feature_scores(net, x)


def attack_score_bins(policy: SitePolicy, strata: dict | None = None) -> dict[str, object]:
    """Crafted weights + the finest bins allowed: every bin holding one case gives that case's x0 and label."""
    x, y = _held_out()
    reply = evaluate_reply(SITE, _payload(_crafted(1.0, 0.0)), x, y, _cfg(64), min_cohort=5, policy=policy,
                           strata=strata)
    counts, psum = np.asarray(reply["counts"]), np.asarray(reply["psum"])
    recovered = []
    for j in range(counts.shape[1]):
        if counts[:, j].sum() == 1:
            cls = int(np.argmax(counts[:, j]))
            recovered.append((_logit_x0(float(psum[cls, j])), cls))
    return {"reply": reply, "recovered": recovered}


def _matches(recovered: list[tuple[float, int]], x0: np.ndarray, y: np.ndarray, tol: float = 1e-9) -> int:
    return sum(any(abs(v - x0[i]) < tol and c == y[i] for i in range(len(x0))) for v, c in recovered)


def test_score_bin_attack_recovers_feature_and_label_from_the_old_reply_only() -> None:
    x, y = _held_out()
    old = attack_score_bins(OLD)
    assert _matches(old["recovered"], x[:, 0], y) >= 5  # most cases are alone in a bin: exact x0 and label
    new = attack_score_bins(DEFAULT)
    assert _matches(new["recovered"], x[:, 0], y) == 0 and not new["recovered"]
    counts = np.asarray(new["reply"]["counts"])
    totals = counts.sum(axis=0)
    assert np.all((totals == 0) | (totals >= DEFAULT.cell_floor)), totals
    assert counts.sum() == N
    # no released bin's mean score is one case's score
    psum = np.asarray(new["reply"]["psum"]).sum(axis=0)
    means = psum[totals > 0] / totals[totals > 0]
    s = _scores(x)
    assert not any(np.isclose(m, s, atol=1e-7).any() for m in means)


def test_score_bins_above_the_policy_are_refused() -> None:
    x, y = _held_out()
    with pytest.raises(PolicyError) as err:
        evaluate_reply(SITE, _payload(_crafted(1.0, 0.0)), x, y, _cfg(1000), min_cohort=5, policy=DEFAULT)
    assert err.value.rule == "histogram_bins"
    # the old path answers 1000 bins, each case alone: every x0 exactly
    reply = evaluate_reply(SITE, _payload(_crafted(1.0, 0.0)), x, y, _cfg(1000), min_cohort=5, policy=OLD)
    assert np.asarray(reply["counts"]).max() == 1


def test_exact_policy_keeps_todays_reply() -> None:
    """cell_floor 1: the reply equals the library function's unguarded one (counts, psum, brier, bootstrap)."""
    from common.classifier.metrics import site_evaluation

    x, y = _held_out()
    cfg = _cfg(20, bootstrap=5)
    reply = evaluate_reply(SITE, _payload(_crafted(0.7, 0.1)), x, y, cfg, min_cohort=5,
                           policy=SitePolicy(exact_outcomes=True))
    ref = site_evaluation(SITE, _scores(x, 0.7, 0.1), y, bins=20, n_boot=5,
                          seed=derive_seed(cfg.seed, SITE, "bootstrap", "logistic"), min_cohort=5)
    for key in ("counts", "psum", "boot_counts", "boot_brier"):
        np.testing.assert_array_equal(reply[key], ref[key])
    assert reply["brier"] == ref["brier"]


def test_bootstrap_replay_recovers_per_case_errors_from_the_old_reply_only() -> None:
    """The old bootstrap seed is the study's seed and the site id: the server replays the draws and solves the
    replicate Brier sums for every case's squared error (with a crafted model: its x0 and label)."""
    x, y = _held_out()
    a = 0.8
    cfg = _cfg(2, bootstrap=60)
    err = np.square(_scores(x, a) - y)

    def attack(policy: SitePolicy) -> np.ndarray:
        reply = evaluate_reply(SITE, _payload(_crafted(a, 0.0)), x, y, cfg, min_cohort=5, policy=policy)
        rng = np.random.default_rng(derive_seed(cfg.seed, SITE, "bootstrap", "logistic"))
        w = np.zeros((cfg.bootstrap, N))
        for b in range(cfg.bootstrap):
            np.add.at(w[b], rng.integers(0, N, N), 1)
        return np.linalg.lstsq(w, np.asarray(reply["boot_brier"]), rcond=None)[0]

    np.testing.assert_allclose(attack(SitePolicy(exact_outcomes=True)), err, atol=1e-9)
    guessed = attack(DEFAULT)
    assert not np.any(np.isclose(guessed, err, atol=1e-6))


def test_stratum_complement_recovers_one_patient_from_the_old_reply_only() -> None:
    """Overall minus a released stratum = the one patient of the suppressed level: their label and x0."""
    x, y = _held_out()
    levels = ["M"] * (N - 1) + ["F"]  # the last case is the only F
    a = 0.9

    def attack(policy: SitePolicy) -> tuple[float, int] | None:
        cfg = _cfg(2)
        reply = evaluate_reply(SITE, _payload(_crafted(a, 0.0)), x, y, cfg, min_cohort=5, policy=policy,
                               strata={"sex": levels})
        if "stratum/sex/M/counts" not in reply:
            return None
        dc = np.asarray(reply["counts"]) - np.asarray(reply["stratum/sex/M/counts"])
        label = int(np.argmax(dc.sum(axis=1)))
        e = float(reply["brier"]) - float(reply["stratum/sex/M/brier"])  # (p - y)^2 of the F patient
        p = 1.0 - np.sqrt(e) if label == 1 else np.sqrt(e)
        return _logit_x0(float(p), a), label

    old = attack(SitePolicy(exact_outcomes=True))
    assert old is not None and old[1] == y[-1] and old[0] == pytest.approx(x[-1, 0], abs=1e-9)
    assert attack(DEFAULT) is None
    reply = evaluate_reply(SITE, _payload(_crafted(a, 0.0)), x, y, _cfg(2), min_cohort=5, policy=DEFAULT,
                           strata={"sex": levels})
    assert reply["suppressed"] == ["sex=F", "sex=M"]


def test_released_strata_share_cells_of_at_least_the_floor() -> None:
    """Two released levels (and the cohort): every cell of each holds 0 or >= cell_floor of its cases."""
    rng = np.random.default_rng(3)
    n = 24
    x = np.column_stack([np.linspace(-3, 3, n) + rng.uniform(-0.05, 0.05, n), rng.normal(size=n)])
    y = (rng.uniform(size=n) < 0.5).astype(np.int64)
    levels = ["a", "b"] * 12  # 6 of each level on each side of 0.5
    reply = evaluate_reply(SITE, _payload(_crafted(1.5, 0.0)), x, y, _cfg(64, bootstrap=3), min_cohort=5,
                           policy=DEFAULT, strata={"g": levels})
    for prefix in ("", "stratum/g/a/", "stratum/g/b/"):
        tot = np.asarray(reply[f"{prefix}counts"]).sum(axis=0)
        assert np.all((tot == 0) | (tot >= 5)), (prefix, tot)
        assert np.asarray(reply[f"{prefix}boot_counts"]).sum(axis=(1, 2)).tolist() == [int(tot.sum())] * 3
    assert reply["suppressed"] == []
    # the confusion counts stay exact (0.5 is kept as an edge when each half can be released)
    from common.classifier.metrics import confusion

    pred = (_scores(x, 1.5) >= 0.5).astype(int)
    assert confusion(np.asarray(reply["counts"]))["tp"] == int(((pred == 1) & (y == 1)).sum())


# ============================================================================================ fingerprint


def _fp_cases(n: int = 7):
    from common.fingerprint import CaseMeasure

    rng = np.random.default_rng(5)
    return [CaseMeasure((0.5 + 0.1 * i, 0.5 + 0.1 * i, 1.0 + 0.37 * i * i), (60 + i * i, 64, 30 + 2 * i),
                        {"T2w": rng.normal(400 + 30 * i, 50, 300)}) for i in range(n)]


def test_fingerprint_extremes_and_medians_are_one_case_in_the_old_reply_only() -> None:
    from common.fingerprint import site_fingerprint

    cases = _fp_cases()
    voxels = {float(v) for c in cases for v in c.foreground["T2w"]}
    spacings = {c.spacing[2] for c in cases}
    shapes = {float(c.shape[0]) for c in cases}

    old = site_fingerprint(SITE, cases, ["T2w"], [0.0, 50.0, 100.0], 5)  # cell_floor 1: today's reply
    assert {float(old["T2w/quantiles"][0]), float(old["T2w/quantiles"][2])} <= voxels  # p0/p100: single voxels
    assert set(map(float, old["T2w/min_max"])) <= voxels
    assert float(old["spacing_median"][2]) in spacings and float(old["shape_median"][0]) in shapes

    with pytest.raises(PolicyError) as err:
        site_fingerprint(SITE, cases, ["T2w"], [0.0, 50.0, 100.0], 5, DEFAULT.cell_floor)
    assert err.value.rule == "percentiles"
    new = site_fingerprint(SITE, cases, ["T2w"], [0.5, 50.0, 99.5], 5, DEFAULT.cell_floor)
    assert not set(map(float, new["T2w/min_max"])) & voxels
    assert float(new["spacing_median"][2]) not in spacings and float(new["shape_median"][0]) not in shapes
    assert float(new["spacing_median"][2]) == pytest.approx(np.mean(sorted(spacings)[1:6]))


def test_fingerprint_quantile_dominated_by_one_case_is_not_released() -> None:
    """A low percentile whose voxels all belong to one (dark) case is replaced by the mean per-case quantile."""
    from common.fingerprint import CaseMeasure, site_fingerprint

    rng = np.random.default_rng(6)
    cases = [CaseMeasure((1.0, 1.0, 1.0), (10, 10, 10), {"T2w": rng.normal(1000, 10, 400)}) for _ in range(5)]
    cases.append(CaseMeasure((1.0, 1.0, 1.0), (10, 10, 10), {"T2w": rng.normal(100, 10, 400)}))
    voxels = {float(v) for v in cases[-1].foreground["T2w"]}
    old = site_fingerprint(SITE, cases, ["T2w"], [1.0], 5)
    lo_old = float(old["T2w/quantiles"][0])
    assert lo_old < 200  # the dark case's own intensity distribution
    new = site_fingerprint(SITE, cases, ["T2w"], [1.0], 5, DEFAULT.cell_floor)
    assert float(new["T2w/quantiles"][0]) not in voxels and float(new["T2w/quantiles"][0]) > 500


def test_guarded_fingerprint_still_plans() -> None:
    from common.fingerprint import aggregate_fingerprints, site_fingerprint

    replies = {s: site_fingerprint(s, _fp_cases(), ["T2w"], [0.5, 5, 50, 95, 99.5], 5, 5) for s in ("a", "b")}
    merged = aggregate_fingerprints(replies, ["T2w"])
    t2 = merged["intensity"]["T2w"]
    assert t2["min"] < t2["percentiles"]["p50"] < t2["max"] and len(merged["target_spacing"]) == 3


# ============================================================================================ preprocessing


def test_preprocessing_edges_are_bounded_and_thin_bins_emptied() -> None:
    from client.steps.preprocessing import histogram_edges, released_histogram

    many = {"T2w/raw_edges": np.linspace(0, 1, 66), "T2w/std_edges": np.linspace(0, 1, 9)}
    with pytest.raises(PolicyError) as err:
        histogram_edges(SITE, many, ["T2w"], DEFAULT.histogram_bins)
    assert err.value.rule == "histogram_bins"
    # narrow edges around one case's intensity: the old reply counts that case's voxels in the middle bin
    rng = np.random.default_rng(1)
    cases = [rng.normal(500, 20, 200) for _ in range(6)] + [np.full(30, 777.0)]
    edges = np.array([0.0, 776.5, 777.5, 5000.0])
    hist = np.zeros(3)
    contributors = np.zeros(3)
    for v in cases:
        h = np.histogram(np.clip(v, edges[0], edges[-1]), edges)[0]
        hist += h
        contributors += h > 0
    assert released_histogram(hist, contributors, 1)[1] == 30  # old: the one case's voxel count at 777
    assert released_histogram(hist, contributors, DEFAULT.cell_floor)[1] == 0


# ============================================================================================ inference counts


def test_inference_counts_under_the_floor_travel_as_a_flag() -> None:
    from common.replies import read_count, small_count
    from common.segmentation.inference import run_inference

    # a site with one unlabelled case: n_empty tells whether the model found that named case tumour-free
    assert small_count("n_empty", 1, 1) == {"n_empty": 1}
    assert small_count("n_empty", 1, DEFAULT.cell_floor) == {"n_empty": "<5"}
    assert small_count("n_empty", 0, 5) == {"n_empty": 0} and small_count("n_empty", 7, 5) == {"n_empty": 7}

    def query(action: str, payload: dict) -> dict:
        return {"s1": {**small_count("n_segmented", 6, 5), **small_count("n_empty", 1, 5)},
                "s2": {**small_count("n_segmented", 2, 5), **small_count("n_empty", 0, 5)}}

    result = run_inference(query, model_weights(build_feature_model("logistic", 1)), {})  # type: ignore[arg-type]
    assert result.segmented == {"s1": 6, "s2": "<5"} and result.empty == {"s1": "<5", "s2": 0}
    assert read_count("s", 3) == 3
    with pytest.raises(Exception, match="count"):
        read_count("s", "12; drop")
