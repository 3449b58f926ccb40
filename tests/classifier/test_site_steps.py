"""The classifier's site steps on a site folder: what leaves the site is aggregate, small sites refuse."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import load_study_config
from common.errors import PolicyError

STUDY = {"phases": ("fingerprint", "classifier"),
         "classifier": {"models": ["logistic"], "features": "compact", "rounds": 2, "bootstrap": 7, "score_bins": 10,
                        "calibration_bins": 5}}


@pytest.fixture(scope="module")
def site_dirs(tmp_path_factory: pytest.TempPathFactory):
    from simulations.harmonisation_sites import simulate_experiment_sites

    return simulate_experiment_sites(tmp_path_factory.mktemp("steps"), sites=2, patients=19, size=32, seed=5)


def _case_dims(reply: dict) -> set[int]:
    return {d for v in reply.values() if isinstance(v, np.ndarray) for d in v.shape} | \
        {len(v) for v in reply.values() if isinstance(v, list)}


def test_no_reply_of_the_classifier_phase_holds_a_case_level_row(site_dirs) -> None:
    from client.classifier.data import site_split
    from client.steps.classifier import evaluate_step, moments_step, nyul_step, train_step
    from common.classifier.models import build_feature_model, model_weights
    from common.validation import load_site

    study = load_study_config(None, **STUDY)
    site = load_site(site_dirs[0])
    split = site_split(site, study)
    n_train, n_test = len(split.train), len(split.test)
    assert (n_train, n_test) == (13, 6)

    moments = moments_step(site, study, {})
    names = moments.pop("feature_names")
    assert len(names) == 30 and moments["n"] == n_train and moments.pop("feature_source") == "compact"
    assert not {n_train, n_test, len(site.cases)} & _case_dims(moments)

    payload = {"model": "logistic", "round": 1, "feature_names": names, "x_mean": moments["mean"],
               "x_scale": np.sqrt(moments["m2"] / moments["n"]),
               **{f"w/{k}": v for k, v in model_weights(build_feature_model("logistic", 30)).items()}}
    reply = train_step(site, study, payload)
    assert reply["num-examples"] == n_train and reply["w/0.weight"].shape == (1, 30)
    assert not {n_train, n_test} & _case_dims(reply)

    reply = evaluate_step(site, study, payload)
    assert reply["n"] == n_test and reply["vendor"] == "Siemens" and reply["field_strength"] == "3T"
    assert reply["boot_counts"].shape == (7, 2, 10) and reply["shap_abs_sum"].shape == (30,)
    assert not {n_test, n_train} & _case_dims(reply)
    sexes = split.clinical.loc[split.test, "sex"].value_counts()
    # a stratum's aggregates travel only when it holds at least min_cohort cases and so does the rest (the
    # overall aggregates minus the released levels must not leave a few patients' values)
    small = {k for k in sexes.index if sexes[k] < 5}
    withheld = set(sexes.index) if sexes[list(small)].sum() in range(1, 5) else small
    assert reply["suppressed"] == [f"sex={k}" for k in sorted(withheld)]
    for k in sexes.index:
        assert (f"stratum/sex/{k}/counts" in reply) == (k not in withheld)

    nyul = nyul_step(site, study, {})
    assert nyul["n_cases"] == n_train and nyul["T2w/landmarks"].shape == (11,)


def test_a_site_below_min_cohort_refuses(site_dirs) -> None:
    from client.steps.classifier import moments_step
    from common.sitedata import SitePolicy
    from common.validation import load_site

    study = load_study_config(None, **STUDY)
    site = load_site(site_dirs[1])
    strict = site.__class__(site.root, site.config.model_copy(update={"policy": SitePolicy(min_cohort=7)}), site.cases)
    with pytest.raises(PolicyError, match="held-out"):
        moments_step(strict, study, {})


def test_a_split_moved_by_a_few_patients_is_refused(site_dirs, tmp_path) -> None:
    """The server chooses the split's seed and fraction: two training sets that differ by a few patients would
    give those patients' rows as the difference of two moments replies. The release ledger refuses the second
    split, and lets through one that differs by at least min_cell patients."""
    import shutil

    from client.classifier.data import site_split
    from client.steps.classifier import moments_step
    from common.validation import load_site

    site_dir = tmp_path / "site"
    shutil.copytree(site_dirs[1], site_dir)
    site = load_site(site_dir)
    first = load_study_config(None, **STUDY)
    base = set(site_split(site, first).train)
    moved: dict[str, object] = {}
    for seed in range(60):
        for fraction in (0.3, 0.32, 0.35, 0.4):
            study = load_study_config(None, **{**STUDY, "classifier": {**STUDY["classifier"], "seed": seed,
                                                                      "holdout_fraction": fraction}})
            d = len(base ^ set(site_split(site, study).train))
            if 0 < d < 5:
                moved.setdefault("few", study)
            elif d >= 12:
                moved.setdefault("many", study)
    assert {"few", "many"} <= set(moved)
    moments_step(site, first, {})
    with pytest.raises(PolicyError, match="release_ledger"):
        moments_step(site, moved["few"], {})  # type: ignore[arg-type]
    moments_step(site, moved["many"], {})  # type: ignore[arg-type]
