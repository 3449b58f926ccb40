"""The site guard's rules one by one (client/guard.py, common/release_ledger.py, the outcomes time floor).

The attacks end to end, a curious ServerApp against the real ClientApp, are in ``test_redteam.py``; here each
rule is checked against the request that breaks it and the honest request it must let through.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from client.guard import RULES, check_reply, check_study, public_reason
from common.config import StudyConfig
from common.errors import PolicyError, ProtocolError, SiteDataError
from common.kmeans import site_cluster_sums
from common.outcomes_site import (
    KMEANS_ASSIGN,
    KMEANS_MOMENTS,
    OUTCOMES_STEPS,
    SURVIVAL_TABLE,
    cohort_from_arrays,
    time_bin,
)
from common.release_ledger import ReleaseLedger
from common.sitedata import Case, Site, SiteConfig


def _site(tmp_path: Path, n: int = 12) -> Site:
    config = SiteConfig(site_id="site-x", scanner={"vendor": "V", "field_strength": 3.0})
    cases = tuple(Case(f"P{i:03d}", {}, None, {"patient_id": f"P{i:03d}"}) for i in range(n))
    return Site(tmp_path, config, cases)


@pytest.mark.parametrize(("study", "rule"), [
    ({"harmonisation": {"categorical": ["os_days"]}}, "allowed_columns"),  # an outcome as a covariate level
    ({"harmonisation": {"continuous": ["sex"]}}, "allowed_columns"),  # the wrong kind
    ({"harmonisation": {"batch": "patient_id"}}, "allowed_columns"),  # one batch per patient
    ({"harmonisation": {"output_file": "release-ledger.json"}}, "allowed_names"),  # overwrite the site's ledger
    ({"harmonisation": {"features_file": "clusters.csv"}}, "allowed_names"),
    ({"classifier": {"fairness_attributes": ["age"]}}, "allowed_columns"),  # continuous: one level per patient
    ({"classifier": {"label": "os_event"}}, "allowed_columns"),
    ({"features": {"settings": "/srv/site/clinical.csv"}}, "allowed_names"),  # a path: never read
    ({"features": {"settings": "../../clinical"}}, "allowed_names"),
    ({"outcomes": {"duration_col": "age"}}, "allowed_columns"),
])
def test_study_fields_are_bound_by_the_site_policy(tmp_path: Path, study: dict, rule: str) -> None:
    phase = next(iter(study)) if next(iter(study)) != "harmonisation" else "harmonisation"
    with pytest.raises(PolicyError) as err:
        check_study(_site(tmp_path), phase, StudyConfig(**study))
    assert err.value.rule == rule and rule in RULES


def test_the_default_study_passes_every_phase(tmp_path: Path) -> None:
    study = StudyConfig(harmonisation={"batch": "scanner", "continuous": ["age"], "categorical": ["sex"]})
    for phase in ("features", "harmonisation", "reduction", "classifier", "outcomes", "segmentation"):
        check_study(_site(tmp_path), phase, study)


def test_refusal_and_error_texts_carry_no_value(tmp_path: Path) -> None:
    """What leaves is a fixed text per rule or kind of failure; the detail (values, ids, paths) does not."""
    detail = "os_days=1011; patient P007 at /srv/site/clinical.csv"
    for err in (PolicyError("site-x", "min_cell", detail), SiteDataError("/srv/site/clinical.csv", detail, "fix"),
                ProtocolError("site-x", detail), ValueError(detail)):
        text = public_reason(err)
        assert "1011" not in text and "P007" not in text and "/srv" not in text and "ValueError" not in text
    assert public_reason(PolicyError("site-y", "min_cell", detail), "site-x") == \
        f"site 'site-x' refuses: policy rule 'min_cell': {RULES['min_cell']}"


def test_a_reply_naming_a_patient_or_a_path_is_withheld(tmp_path: Path) -> None:
    site = _site(tmp_path)
    check_reply(site, {"n": 12, "features": ["T2w_mean", "P0"], "source": "features.csv"})
    for reply in ({"failures": ["P003"]}, {"note": f"read {tmp_path}/clinical.csv"}, {"x": {"P011": 1}},
                  {"ids": np.array(["P001"])}):
        with pytest.raises(PolicyError, match="reply_check"):
            check_reply(site, reply)


def test_time_bins_are_the_site_grid_whatever_the_request() -> None:
    """1e-6 days or 10 days asked: the site's 7-day grid, one set of edges (two grids would isolate a patient
    between their edges); without a site floor (the unguarded path) the request's width."""
    for asked in (1e-6, 10.0, 28.0):
        assert time_bin("s", False, {"mode": "binned", "time_bin_days": asked}, 7.0) == 7.0
    assert time_bin("s", False, {"mode": "binned", "time_bin_days": 1e-6}, None) == 1e-6
    for bad in (float("nan"), float("inf"), 0.0, -7.0):
        with pytest.raises(ProtocolError):
            time_bin("s", False, {"mode": "binned", "time_bin_days": bad}, 7.0)
    with pytest.raises(PolicyError, match="exact_outcomes"):
        time_bin("s", False, {"mode": "exact"}, 7.0)


def test_release_ledger_pairwise_rule(tmp_path: Path) -> None:
    ids = [f"P{i}" for i in range(12)]
    ledger = ReleaseLedger("s", tmp_path / "ledger.json", min_diff=5)
    ledger.release("f", ids, [ids[:6], ids[6:]], "study-1")
    assert ledger.conflict("f", ids, [ids[:6], ids[6:]]) is None  # the same again: nothing new
    assert ledger.conflict("f", ids, [ids[:7], ids[7:]]) == 1  # one patient moved
    assert ledger.conflict("f", ids, [ids[:2], ids[2:]]) == 2  # a cell of 2 (and U minus it)
    assert ledger.conflict("f", ids, [ids[:11:2], ids[1::2]]) is None  # differs by 6 from every earlier set
    assert ledger.conflict("g", ids, [ids[:7], ids[7:]]) is None  # another scope
    with pytest.raises(PolicyError, match="release_ledger"):
        ledger.release("f", ids, [ids[:7], ids[7:]], "study-2")
    again = ReleaseLedger("s", tmp_path / "ledger.json", min_diff=5)  # a restart reads what was released
    assert again.conflict("f", ids, [ids[:7], ids[7:]]) == 1
    assert all(p not in (tmp_path / "ledger.json").read_text() for p in ids)  # ids are kept hashed


def test_a_refusal_freezes_its_scope_for_the_study_and_closes_it_after_max_refusals(tmp_path: Path) -> None:
    """A refusal is a yes/no answer about a few patients: after the first one in a study the site answers that
    scope as frozen without looking again, and after ``max_refusals`` frozen studies it refuses for good."""
    ids = [f"P{i}" for i in range(12)]
    ledger = ReleaseLedger("s", None, min_diff=5, max_refusals=3, max_holds=2)
    assert ledger.try_release("f", ids, [ids[:6], ids[6:]], "A")
    assert not ledger.try_release("f", ids, [ids[:7], ids[7:]], "A")  # one patient moved: a first hold
    assert ledger.try_release("f", ids, [ids[:6], ids[6:]], "A")  # a fine answer still leaves
    assert not ledger.try_release("f", ids, [ids[:5], ids[5:]], "A")  # the second hold: frozen for A
    assert not ledger.try_release("f", ids, [ids[:6], ids[6:]], "A")  # even an answer that alone could leave
    assert ledger.try_release("f", ids, [ids[:6], ids[6:]], "B")  # another study: the rule again
    assert ledger.try_release("g", ids, [ids[:7], ids[7:]], "A")  # another scope
    for study in ("C", "D"):  # a refusal in a study counts towards closing the scope
        assert not ledger.try_release("f", ids, [ids[:7], ids[7:]], study)
    assert ledger.frozen("f", "E") and not ledger.try_release("f", ids, [ids[:6], ids[6:]], "E")  # closed


def _sweep_attack(step: Callable[[np.ndarray], dict], n: int, d: int, x_site: np.ndarray) -> int:
    """The issue's k-means differencing: sweep one centre along feature 0, difference successive cluster sums;
    returns the number of the site's rows recovered exactly."""
    previous = None
    recovered = 0
    thresholds = np.concatenate([[x_site[:, 0].max() + 1.0], np.sort(x_site[:, 0])[::-1] - 1e-9])
    for t in thresholds:  # a server would sweep a fine grid; these are the points of it where a cell changes
        below, above = np.zeros(d), np.zeros(d)
        below[0], above[0] = t - 1.0, t + 1.0  # the cells are the half-spaces x0 < t and x0 > t
        reply = step(np.stack([below, above]))
        sums, counts = np.asarray(reply["sums"])[1], float(np.asarray(reply["counts"])[1])
        total_sum, total_n = x_site.sum(axis=0), float(n)
        if counts == 0 and reply.get("suppressed"):  # a withheld cell: the total minus the other cell
            sums, counts = total_sum - np.asarray(reply["sums"])[0], total_n - float(np.asarray(reply["counts"])[0])
        if previous is not None and counts == previous[1] + 1:
            row = sums - previous[0]
            recovered += int(np.any(np.all(np.abs(x_site - row) < 1e-9, axis=1)))
        previous = (sums, counts)
    return recovered


def test_kmeans_differencing_recovers_rows_without_the_ledger_and_none_with_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3))
    ids = [f"P{i}" for i in range(12)]
    mean, scale = np.zeros(3), np.ones(3)

    def unguarded(centres: np.ndarray) -> dict:  # the site function as it was: cells under min_cell withheld
        return site_cluster_sums("s", x, centres, min_cell=5, min_cohort=5)

    cohort = cohort_from_arrays("s", features=x, min_cohort=5, min_cell=5)
    cohort.ids, cohort.ledger = tuple(ids), ReleaseLedger("s", tmp_path / "ledger.json", 5)
    cohort.study_key = "curious"
    OUTCOMES_STEPS[KMEANS_MOMENTS](cohort, {})

    def guarded(centres: np.ndarray) -> dict:
        return OUTCOMES_STEPS[KMEANS_ASSIGN](cohort, {"mean": mean, "scale": scale, "centres": centres})

    assert _sweep_attack(unguarded, 12, 3, x) == 12  # every row, as the issue measured on the old site step
    assert _sweep_attack(guarded, 12, 3, x) == 0


def test_survival_relabelling_is_refused_by_the_ledger(tmp_path: Path) -> None:
    """Two groupings that differ by one patient: the second table is refused, not differenced."""
    rng = np.random.default_rng(1)
    days, events = rng.integers(30, 2000, 20).astype(float), rng.integers(0, 2, 20)
    ids = tuple(f"P{i}" for i in range(20))
    groups = np.array([0] * 10 + [1] * 10)
    cohort = cohort_from_arrays("s", durations=days, events=events, groups=groups, min_cohort=5, min_cell=5,
                                exact=False)
    cohort.survival_ids, cohort.ledger = ids, ReleaseLedger("s", tmp_path / "ledger.json", 5, max_holds=1)
    cohort.time_floor, cohort.survival_source = 7.0, "clinical.csv os_days/os_event"
    request = {"mode": "binned", "time_bin_days": 7.0}
    cohort.study_key = "study-1"
    OUTCOMES_STEPS[SURVIVAL_TABLE](cohort, request)
    cohort.labels, cohort.study_key = np.array([0] * 11 + [1] * 9), "study-2"  # the server moved patient P10
    with pytest.raises(PolicyError, match="release_ledger"):
        OUTCOMES_STEPS[SURVIVAL_TABLE](cohort, request)
    cohort.labels, cohort.study_key = np.array([0, 1] * 10), "study-3"  # a grouping singling out no one: released
    OUTCOMES_STEPS[SURVIVAL_TABLE](cohort, request)
    cohort.study_key = "study-2"  # but not in the study that was refused: frozen there
    with pytest.raises(PolicyError, match="release_ledger"):
        OUTCOMES_STEPS[SURVIVAL_TABLE](cohort, request)


def test_held_kmeans_answers_are_not_a_line_oracle(tmp_path: Path) -> None:
    """The review's probe: "held" answered exactly when 1-4 patients lay beyond the server's line, a free yes/no
    per request. Now the second hold freezes the study's k-means: every later answer is the same, wherever the
    line is."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 2))
    cohort = cohort_from_arrays("s", features=x, min_cohort=5, min_cell=5)
    cohort.ids, cohort.ledger, cohort.study_key = tuple(f"P{i}" for i in range(12)), ReleaseLedger("s", None, 5), "q"
    OUTCOMES_STEPS[KMEANS_MOMENTS](cohort, {})
    answers = []
    for t in np.linspace(x[:, 0].max() + 0.5, x[:, 0].min() - 0.5, 40):  # the line x0 = t swept across the site
        centres = np.array([[t - 1.0, 0.0], [t + 1.0, 0.0]])
        reply = OUTCOMES_STEPS[KMEANS_ASSIGN](cohort, {"mean": np.zeros(2), "scale": np.ones(2), "centres": centres})
        answers.append((int(reply["held"]), tuple(np.asarray(reply["counts"]).tolist())))
    holds = [i for i, a in enumerate(answers) if a[0]]
    assert len(set(answers[holds[1]:])) == 1  # after the second hold (max_ledger_holds): one answer, whatever the line


def test_a_study_gets_a_bounded_number_of_requests_per_scope() -> None:
    """Where the first refusal falls among a study's requests tells more than one bit (a sweep learns where the
    first patient crossed the line): after ``max_requests`` a study's scope is frozen, so a study tells at most
    log2(max_requests) bits; requests a study fixes once (``count=False``) do not count."""
    ids = [f"P{i}" for i in range(12)]
    ledger = ReleaseLedger("s", None, min_diff=5, max_refusals=3, max_requests=4)
    for _ in range(4):
        assert ledger.try_release("f", ids, [ids[:6], ids[6:]], "A")
    assert not ledger.try_release("f", ids, [ids[:6], ids[6:]], "A") and ledger.frozen("f", "A")
    for _ in range(10):
        assert ledger.try_release("split", ids, [ids[:6]], "A", count=False)


def test_kmeans_centres_other_than_the_study_k_are_refused_before_any_data(tmp_path: Path) -> None:
    """The review's noisy-mode oracle: a third centre marking a half-space labelled patients into a group the
    study lacks, and the error (or not) answered whether anyone lay there. The shape is checked first."""
    from client.steps.outcomes import check_centres_count

    study = StudyConfig(outcomes={"k": 2})
    check_centres_count(_site(tmp_path), study, {"centres": np.zeros((2, 3))})
    for payload in ({"centres": np.zeros((3, 3))}, {"centres": np.zeros((2, 3)), "previous": np.zeros((1, 3))}):
        with pytest.raises(PolicyError, match="request_shape"):
            check_centres_count(_site(tmp_path), study, payload)


def test_segmentation_quartiles_are_block_means_or_the_mean() -> None:
    """The review's probe: with 6 cases and cells of 5 the clamped q25 window and the exact sum gave the best
    case's value (sum - 5 q25). Under 4 x 5 + 2 cases every quartile is the mean; from there on, disjoint means
    of 5 cases, and no linear combination of the released values isolates fewer than 5 cases."""
    from common.segmentation.metrics import describe

    rng = np.random.default_rng(5)
    for n in (6, 9, 11, 21):
        v = rng.uniform(0.3, 0.9, n).round(4)
        d = describe(v.tolist(), cell_floor=5)
        assert d["q25"] == d["median"] == d["q75"] == pytest.approx(v.mean())  # sum - 5 q25: no case's value
    v = np.sort(rng.uniform(0.3, 0.9, 22))
    d = describe(v.tolist(), cell_floor=5)
    assert d["median"] not in v and d["q25"] not in v and len({d["q25"], d["median"], d["q75"]}) == 3
    assert describe(v.tolist(), cell_floor=1)["median"] == pytest.approx(np.median(v))  # exact policy unchanged


def test_noisy_sites_refuse_exact_cox_sums(tmp_path: Path) -> None:
    """In noisy mode Cox sums would be exact and uncharged (the review's probe): refused before any data."""
    from client.steps.outcomes import STEPS
    from common.outcomes_site import COX_MOMENTS, COX_SUMS

    site = _site(tmp_path)
    noisy = Site(site.root, site.config.model_copy(update={"policy": site.config.policy.model_copy(
        update={"noise_epsilon": 1.0})}), site.cases)
    for action in (COX_MOMENTS, COX_SUMS):
        with pytest.raises(PolicyError, match="noisy_release"):
            STEPS[action].run(noisy, StudyConfig(), {"mode": "binned", "time_bin_days": 7.0, "groups": [0, 1]})
