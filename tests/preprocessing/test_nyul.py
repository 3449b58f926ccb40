"""Nyúl standardisation learnt federatedly: the maths against the pooled oracle, the privacy rule, and the
across-site spread of a tissue's median intensity on simulated hospitals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.preprocessing.pipeline import build_pipeline, load_case
from client.steps.preprocessing import nyul_landmarks_step
from common.config import PreprocessingConfig, load_study_config
from common.errors import PolicyError, ProtocolError
from common.nyul import aggregate_nyul, case_landmarks, map_to_scale, nyul_transform, site_nyul
from common.plan import NyulPlan
from common.validation import load_site

PCT = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
SCALE = (0.0, 100.0)


def _random_cases(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    cases = []
    for _ in range(n):
        scale, offset = rng.uniform(0.5, 2.0), rng.uniform(-50, 50)
        values = offset + scale * rng.gamma(3.0, 100.0, size=2000)
        cases.append({"T2w": case_landmarks(values, PCT)})
    return cases


def test_federated_standard_scale_equals_the_pooled_nyul_scale() -> None:
    rng = np.random.default_rng(0)
    sites = {"a": _random_cases(rng, 5), "b": _random_cases(rng, 9), "c": _random_cases(rng, 6)}
    replies = {s: site_nyul(s, cases, ["T2w"], PCT, SCALE, min_cohort=5) for s, cases in sites.items()}
    fed = aggregate_nyul(replies, ["T2w"])
    pooled = np.mean([map_to_scale(c["T2w"], SCALE) for cases in sites.values() for c in cases], axis=0)
    assert np.allclose(fed["landmarks"]["T2w"], pooled, rtol=0, atol=1e-10)
    assert fed["landmarks"]["T2w"][0] == pytest.approx(0.0) and fed["landmarks"]["T2w"][-1] == pytest.approx(100.0)
    assert fed["n_cases"] == 20 and fed["cases_per_site"] == {"a": 5, "b": 9, "c": 6}
    # the unweighted mean of site means is not the pooled scale: the weighting matters
    unweighted = np.mean([replies[s]["T2w/landmarks"] for s in sites], axis=0)
    assert not np.allclose(unweighted, pooled, atol=1e-3)


def test_site_reply_holds_aggregates_only_and_respects_min_cohort() -> None:
    rng = np.random.default_rng(1)
    cases = _random_cases(rng, 6)
    reply = site_nyul("s", cases, ["T2w"], PCT, SCALE, min_cohort=5)
    assert set(reply) == {"n_cases", "percentiles", "scale", "T2w/landmarks"}
    assert np.asarray(reply["T2w/landmarks"]).shape == (len(PCT),)
    for c in cases:  # no case's own landmarks are in the reply
        assert not np.allclose(reply["T2w/landmarks"], map_to_scale(c["T2w"], SCALE))
    with pytest.raises(PolicyError, match="min_cohort"):
        site_nyul("s", cases[:4], ["T2w"], PCT, SCALE, min_cohort=5)


def test_server_rejects_inconsistent_or_broken_replies() -> None:
    rng = np.random.default_rng(2)
    good = site_nyul("a", _random_cases(rng, 5), ["T2w"], PCT, SCALE, 5)
    other = site_nyul("b", _random_cases(rng, 5), ["T2w"], PCT[1:], SCALE, 5)
    with pytest.raises(ProtocolError, match="'b'.*percentiles"):
        aggregate_nyul({"a": good, "b": other}, ["T2w"])
    broken = dict(good, **{"T2w/landmarks": np.asarray(good["T2w/landmarks"])[::-1]})
    with pytest.raises(ProtocolError, match="non-decreasing"):
        aggregate_nyul({"a": good, "b": broken}, ["T2w"])
    with pytest.raises(ProtocolError, match="lacks 'CET1/landmarks'"):
        aggregate_nyul({"a": good}, ["T2w", "CET1"])


def test_transform_maps_landmarks_exactly_and_extends_the_end_segments() -> None:
    own = np.array([10.0, 20.0, 40.0, 80.0])
    standard = np.array([0.0, 30.0, 50.0, 100.0])
    assert np.allclose(nyul_transform(own, own, standard), standard)
    out = nyul_transform(np.array([0.0, 15.0, 100.0]), own, standard)
    assert np.allclose(out, [-30.0, 15.0, 100.0 + 20.0 * 50.0 / 40.0])
    values = np.linspace(-50, 150, 401)
    assert np.all(np.diff(nyul_transform(values, own, standard)) > 0)  # monotone


def _tissue_medians(sites: list[Path], images: dict[str, dict[str, dict[str, np.ndarray]]], seq: str,
                    label: int) -> tuple[np.ndarray, np.ndarray]:
    """Per site: the median of a tissue over its cases, and the foreground's inter-quartile range."""
    medians, iqrs = [], []
    for site_dir in sites:
        tissue, foreground = [], []
        for pid, arrays in images[site_dir.name].items():
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(site_dir / "truth" / f"{pid}_tissues.nii.gz")))
            tissue.append(arrays[seq][truth == label])
            foreground.append(arrays[seq][truth > 0])
        medians.append(np.median(np.concatenate(tissue)))
        q1, q3 = np.percentile(np.concatenate(foreground), [25, 75])
        iqrs.append(q3 - q1)
    return np.asarray(medians), np.asarray(iqrs)


def test_federated_nyul_shrinks_the_across_site_spread_of_tissue_medians_5x(small_sites: list[Path]) -> None:
    """Spread = standard deviation of the sites' tissue medians over the mean foreground IQR (a unit-free
    measure, unchanged by any affine change of intensity units)."""
    study = load_study_config(None, preprocessing={"steps": ["normalise"]})
    replies, cases = {}, {}
    for site_dir in small_sites:
        site = load_site(site_dir)
        replies[site.site_id] = nyul_landmarks_step(site, study, {})  # the site adapter of query.nyul_landmarks
        cases[site_dir.name] = [load_case(c, study.sequences, "T2w") for c in site.cases]
    agg = aggregate_nyul(replies, study.sequences)
    nyul = NyulPlan(percentiles=tuple(agg["percentiles"]), scale=tuple(agg["scale"]),
                    landmarks={k: tuple(v) for k, v in agg["landmarks"].items()})
    standardise = build_pipeline(PreprocessingConfig(steps=("normalise",)), None, nyul)
    raw = {s: {c.patient_id: {q: sitk.GetArrayFromImage(c.images[q]) for q in study.sequences} for c in cs}
           for s, cs in cases.items()}
    std = {s: {c.patient_id: {q: sitk.GetArrayFromImage(img) for q, img in standardise(c).images.items()}
               for c in cs} for s, cs in cases.items()}
    body = 1
    for seq in study.sequences:
        raw_m, raw_iqr = _tissue_medians(small_sites, raw, seq, body)
        std_m, std_iqr = _tissue_medians(small_sites, std, seq, body)
        spread_raw = raw_m.std() / raw_iqr.mean()
        spread_std = std_m.std() / std_iqr.mean()
        assert spread_raw >= 5.0 * spread_std, (seq, spread_raw, spread_std)
        assert 0.0 < std_m.min() and std_m.max() < 100.0  # on the standard scale [0, 100]
