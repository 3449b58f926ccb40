"""Red team (issue 14): a curious server runs each attack of the issue, once against the site steps as they
were before the guard (:class:`tests.security.curious.UnguardedSites`: the attacks must recover patient
values, so these tests can fail) and once through Flower's simulation engine against the real ClientApp (one
simulation for every attack: each must be refused or recover nothing that identifies a patient).

The sites of both runs have one case without a mask each (for the inference round), require DP and have a
lifetime ``max_epsilon`` that one private classifier round fits and two do not (:func:`_attack_sites`).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.security import curious
from tests.security.conftest import PATIENTS, unlabel_last_case
from tests.security.curious import SiteTruth, errors_of, leaks, replies_of, site_truth

pytestmark = pytest.mark.timeout(600)
SITE_DELTA = 1e-5  # the default policy's max_delta


def _attacks(site_dirs: list[Path]) -> dict[str, curious.Attack]:
    return {
        "kmeans_differencing": curious.attack_kmeans_differencing,
        "survival_bin_width": curious.attack_survival_bin_width,
        "group_relabelling": curious.attack_group_relabelling,
        "refusal_texts": curious.attack_refusal_texts,
        "file_read": curious.file_read_attack(site_dirs),
        "score_bins": curious.attack_score_bins,
        "fingerprint_extremes": curious.attack_fingerprint_extremes,
        "dp_bounds": curious.attack_dp_bounds,
        "small_counts": curious.attack_small_counts,  # last: it writes predicted masks at the sites
    }


def _epsilon(sigma: float, q: float, delta: float = SITE_DELTA, rounds: int = 1) -> float:
    from client.training.dp import epsilon_of

    return float(epsilon_of("rdp", [[sigma, q, curious.DP_STEPS]] * rounds, delta))


def _n_train(site_dir: Path) -> int:
    """The training cases of the attacker's classifier split at a site (cases with a tumour mask)."""
    from client.classifier.data import site_split
    from client.steps.classifier import with_tumour
    from common.validation import load_site

    return len(site_split(with_tumour(load_site(site_dir)), curious.classifier_study()).train)


def _attack_sites(copy_sites: Callable[[str], list[Path]], name: str) -> list[Path]:
    """A copy of the sites for one run: the last patient of each without a mask (a case for the inference
    round), DP required and a lifetime ``max_epsilon`` between one private round of
    :func:`curious.attack_dp_bounds` and two."""
    from tests.segmentation.conftest import set_policy

    sites = copy_sites(name)
    for d in sites:
        unlabel_last_case(d)
    q = [curious.DP_BATCH / _n_train(d) for d in sites]
    one, two = max(_epsilon(curious.DP_SIGMA, x) for x in q), min(_epsilon(curious.DP_SIGMA, x, rounds=2) for x in q)
    assert one < two
    for d in sites:
        set_policy(d, require_dp=True, max_epsilon=(one + two) / 2)
    return sites


@pytest.fixture(scope="module")
def unguarded(copy_sites: Callable[[str], list[Path]], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[list[Path], dict[str, object]]]:
    """Every attack against the unguarded site steps (a copy of the sites), and their results."""
    repo = str(Path(__file__).resolve().parents[2])
    if shutil.which("git") is None or shutil.which("tar") is None or subprocess.run(
            ["git", "-C", repo, "cat-file", "-e", f"{curious.UNGUARDED_COMMIT}^{{commit}}"],
            capture_output=True).returncode != 0:
        pytest.skip("the unguarded site is exported from git history (needs git, tar and a clone with history)")
    sites = _attack_sites(copy_sites, "unguarded")
    worker = curious.UnguardedSites(sites, tmp_path_factory.mktemp("unguarded-work"))
    try:
        results = {}
        for name, attack in _attacks(sites).items():
            results[name] = curious.jsonable(attack(worker.ask))
        yield sites, results
    finally:
        worker.close()


@pytest.fixture(scope="module")
def guarded(copy_sites: Callable[[str], list[Path]], tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[list[Path], dict[str, object]]:
    """Every attack in one simulation against the real ClientApp (a fresh copy of the sites)."""
    sites = _attack_sites(copy_sites, "guarded")
    return sites, curious.run_attacks(sites, _attacks(sites), tmp_path_factory.mktemp("guarded-run"))


def _truths(sites: list[Path]) -> dict[str, SiteTruth]:
    return {t.site_id: t for t in (site_truth(p) for p in sites)}


def _result(results: dict[str, object], name: str) -> dict:
    result = results[name]
    assert isinstance(result, dict)
    assert "raised" not in result, result
    return result


# ============================================================================================ checks


def rows_recovered(result: dict, truth: SiteTruth) -> int:
    """Patients of the site whose whole feature row is among the attack's rows (within 1e-9, relative)."""
    rows = np.asarray(result.get("recovered", {}).get(truth.site_id, []), dtype=np.float64)
    if rows.size == 0:
        return 0
    table = truth.features[result["features"]].to_numpy(np.float64)
    hit = [np.any(np.all(np.abs(rows - row) <= 1e-9 * np.maximum(1.0, np.abs(row)), axis=1)) for row in table]
    return int(np.sum(hit))


def exact_days(result: dict, truth: SiteTruth) -> int:
    """Released times that are a patient's exact os_days (within 1e-5 day)."""
    days = truth.clinical["os_days"].to_numpy(np.float64)
    return sum(bool(np.any(np.abs(days - t) <= 1e-5)) for t in result.get("times", {}).get(truth.site_id, []))


def quotes_row(text: str, truth: SiteTruth) -> bool:
    """Whether ``text`` holds 16 consecutive characters of a patient row of the site's clinical.csv."""
    lines = (truth.root / "clinical.csv").read_text().splitlines()[1:]
    return any(line[i:i + 16] in text for line in lines for i in range(max(len(line) - 15, 1)))


def _error_texts(answer: object) -> list[str]:
    if isinstance(answer, dict):
        own = [str(answer["error"])] if "error" in answer else []
        return own + [t for v in answer.values() for t in _error_texts(v)]
    return []


# ============================================================================================ k-means differencing


def test_kmeans_differencing_recovers_rows_without_the_guard(unguarded: tuple) -> None:
    sites, results = unguarded
    result = _result(results, "kmeans_differencing")
    for truth in _truths(sites).values():
        assert rows_recovered(result, truth) == PATIENTS  # the issue measured 12/12 on the old code


def test_kmeans_differencing_fails_against_the_site(guarded: tuple) -> None:
    sites, results = guarded
    result = _result(results, "kmeans_differencing")
    for truth in _truths(sites).values():
        assert rows_recovered(result, truth) == 0
    assert leaks(result, sites) == []


# ============================================================================================ survival bin width


def test_tiny_time_bins_release_exact_days_without_the_guard(unguarded: tuple) -> None:
    sites, results = unguarded
    result = _result(results, "survival_bin_width")
    for truth in _truths(sites).values():
        assert exact_days(result, truth) >= 2  # every released cell's time is its last patient's day


def test_tiny_time_bins_fail_against_the_site(guarded: tuple) -> None:
    sites, results = guarded
    result = _result(results, "survival_bin_width")
    for truth in _truths(sites).values():
        assert exact_days(result, truth) == 0
    assert leaks(result, sites) == []


# ============================================================================================ group relabelling


def _moved_patient(result: dict, truth: SiteTruth) -> str:
    """The patient the attack moves: the site's highest value of the split feature."""
    return str(truth.features[result["features"][0]].idxmax())


def test_relabelling_one_patient_reveals_its_event_without_the_guard(unguarded: tuple) -> None:
    sites, results = unguarded
    result = _result(results, "group_relabelling")
    for site_id, truth in _truths(sites).items():
        found = result["sites"][site_id]
        assert found["moved"] == 1
        assert found["flag"] == int(truth.clinical.loc[_moved_patient(result, truth), "os_event"])


def test_relabelling_one_patient_fails_against_the_site(guarded: tuple) -> None:
    sites, results = guarded
    result = _result(results, "group_relabelling")
    policy_min = 5
    assert all(found["moved"] >= policy_min for found in result["sites"].values()), result["sites"]
    assert leaks(result, sites) == []


# ============================================================================================ refusal texts


def test_refusal_texts_carry_values_without_the_guard(unguarded: tuple) -> None:
    sites, results = unguarded
    result = _result(results, "refusal_texts")
    assert any("os_days" in line for line in leaks(result["combat_summary"], sites))
    assert any("age" in line for line in leaks(result["evaluate.classifier"], sites))
    assert any("exception text" in line for line in leaks(result["kmeans_assign_malformed"], sites))


def test_refusal_texts_carry_no_value_from_the_site(guarded: tuple) -> None:
    sites, results = guarded
    result = _result(results, "refusal_texts")
    assert leaks(result, sites) == []
    texts = _error_texts(result)
    assert not [t for t in texts if "os_days=" in t or "age=" in t]
    assert result["combat_summary"] and all(k.startswith("node-") for k in result["combat_summary"]), \
        "ComBat on os_days as a categorical covariate must be refused"


# ============================================================================================ file read


def test_settings_path_reads_clinical_csv_without_the_guard(unguarded: tuple) -> None:
    sites, results = unguarded
    result = _result(results, "file_read")
    truths = _truths(sites)
    texts = _error_texts(result)
    assert any(quotes_row(t, truth) for t in texts for truth in truths.values())
    assert any("site path" in line for line in leaks(result, sites))


def test_settings_path_is_refused_by_the_site(guarded: tuple) -> None:
    sites, results = guarded
    result = _result(results, "file_read")
    truths = _truths(sites)
    assert all(k.startswith("node-") for answer in result.values() for k in answer), "naming a path must be refused"
    assert not [t for t in _error_texts(result) for truth in truths.values() if quotes_row(t, truth)]
    assert leaks(result, sites) == []


# ============================================================================================ score-bin inversion


def values_recovered(result: dict, truth: SiteTruth) -> int:
    """Recovered (value, label) pairs that are one patient's exact feature value (within 1e-9) and label."""
    table = truth.features[result["feature"]]
    labels = truth.clinical["label"]
    hits = 0
    for value, label in result.get("recovered", {}).get(truth.site_id, []):
        near = table.index[np.abs(table.to_numpy(np.float64) - value) <= 1e-9 * max(1.0, abs(value))]
        hits += any(int(labels.loc[pid]) == int(label) for pid in near)
    return hits


def test_score_bins_invert_to_a_feature_value_without_the_guard(unguarded: tuple) -> None:
    sites, results = unguarded
    result = _result(results, "score_bins")
    for truth in _truths(sites).values():
        assert values_recovered(result, truth) >= 3  # most held-out cases are alone in one of 64 bins


def test_score_bins_invert_to_nothing_at_the_site(guarded: tuple) -> None:
    sites, results = guarded
    result = _result(results, "score_bins")
    truths = _truths(sites)
    assert set(replies_of(result["answer"])) == set(truths), "the honest-looking evaluation is answered"
    for truth in truths.values():
        assert result["recovered"][truth.site_id] == [] and values_recovered(result, truth) == 0
        totals = np.asarray(result["answer"][truth.site_id]["counts"]).sum(axis=0)
        assert np.all((totals == 0) | (totals >= 5)), totals
    assert leaks(result, sites) == []


# ============================================================================================ fingerprint extremes


def tumour_voxels(truth: SiteTruth, sequence: str) -> set[float]:
    """Every intensity inside a tumour mask of the site (what a fingerprint's extremes must not be)."""
    import SimpleITK as sitk

    from common.imageio import read_image
    from common.validation import load_site

    found: set[float] = set()
    for case in load_site(truth.root).cases:
        if case.mask is not None:
            mask = sitk.GetArrayFromImage(read_image(case.mask)) > 0
            found |= set(sitk.GetArrayFromImage(read_image(case.images[sequence]))[mask].astype(np.float64).tolist())
    return found


def _extremes(answer: dict, site_id: str, sequence: str) -> dict[str, list[float]]:
    reply = answer.get(site_id, {})
    return {k: [float(v) for v in reply[f"{sequence}/{k}"]] for k in ("quantiles", "min_max")
            if f"{sequence}/{k}" in reply}


def test_fingerprint_extremes_are_single_voxels_without_the_guard(unguarded: tuple) -> None:
    sites, results = unguarded
    result = _result(results, "fingerprint_extremes")
    for truth in _truths(sites).values():
        for seq in ("T2w", "CET1"):
            voxels = tumour_voxels(truth, seq)
            extremes = _extremes(result["extremes"], truth.site_id, seq)
            assert len(extremes["quantiles"]) == 2 and set(extremes["quantiles"]) <= voxels  # p0, p100
            assert set(_extremes(result["inner"], truth.site_id, seq)["min_max"]) <= voxels


def test_fingerprint_extremes_are_refused_or_no_voxel_at_the_site(guarded: tuple) -> None:
    sites, results = guarded
    result = _result(results, "fingerprint_extremes")
    truths = _truths(sites)
    assert _refused_by(result["extremes"], "percentiles", len(truths))
    for truth in truths.values():
        for seq in ("T2w", "CET1"):
            min_max = _extremes(result["inner"], truth.site_id, seq)["min_max"]
            assert len(min_max) == 2 and not set(min_max) & tumour_voxels(truth, seq)
    assert leaks(result, sites) == []


# ============================================================================================ DP bounds


def _refused_by(answer: dict, rule: str, n_sites: int) -> bool:
    """Whether every one of ``n_sites`` answered a policy refusal naming ``rule`` (and nothing else)."""
    from common.protocol import ERROR_POLICY

    errors = errors_of(answer)
    return (not replies_of(answer) and len(errors) == n_sites
            and all(e["code"] == int(ERROR_POLICY) and f"policy rule {rule!r}" in e["error"]
                    for e in errors.values()))


def test_training_past_the_privacy_bounds_runs_without_the_guard(unguarded: tuple) -> None:
    sites, results = unguarded
    result = _result(results, "dp_bounds")
    for site_id, n in result["n_train"].items():
        assert result["no_dp"][site_id]["dp"] == 0.0 and result["no_dp"][site_id]["num-examples"] == n
        one = result["batch_one"][site_id]  # the epsilon of a sampling rate 1/n: steps over one patient
        assert one["dp"] == 1.0 and one["epsilon"] == pytest.approx(_epsilon(curious.BATCH_ONE_SIGMA, 1 / n),
                                                                    rel=1e-9)
        at_09 = result["delta_0.9"][site_id]  # counted at the server's delta
        q = curious.DP_BATCH / n
        assert at_09["delta"] == 0.9 and at_09["epsilon"] == pytest.approx(_epsilon(curious.DP_SIGMA, q, 0.9), rel=1e-9)
        assert at_09["epsilon"] < _epsilon(curious.DP_SIGMA, q) - 1.0
        for study in ("study_a", "study_b"):  # each study's accountant starts from zero: B is accepted
            assert result[study][site_id]["epsilon"] == pytest.approx(_epsilon(curious.DP_SIGMA, q), rel=1e-9)


def test_training_past_the_privacy_bounds_is_refused_by_the_site(guarded: tuple) -> None:
    from client.privacy_ledger import read_charges

    sites, results = guarded
    result = _result(results, "dp_bounds")
    n_sites = len(sites)
    assert _refused_by(result["no_dp"], "require_dp", n_sites), result["no_dp"]
    assert _refused_by(result["batch_one"], "min_batch_size", n_sites), result["batch_one"]
    assert _refused_by(result["delta_0.9"], "max_delta", n_sites), result["delta_0.9"]
    assert set(replies_of(result["study_a"])) == set(result["n_train"])  # one study within the lifetime budget
    for site_id, n in result["n_train"].items():
        assert result["study_a"][site_id]["epsilon"] == pytest.approx(_epsilon(curious.DP_SIGMA, curious.DP_BATCH / n),
                                                                      rel=1e-9)
    assert _refused_by(result["study_b"], "max_epsilon", n_sites), result["study_b"]
    for d in sites:  # the lifetime ledger holds study A's round only: nothing refused was charged
        assert [c.phase for c in read_charges(d)] == ["classifier"]
    assert leaks(result, sites) == []


# ============================================================================================ small counts


def test_inference_counts_tell_the_one_unlabelled_case_without_the_guard(unguarded: tuple) -> None:
    sites, results = unguarded
    result = _result(results, "small_counts")
    for truth in _truths(sites).values():
        found = result["sites"][truth.site_id]
        masks = len(list((truth.root / "derived" / "predicted_masks").glob("*.nii.gz")))
        assert found["unlabelled"] == 1 and found["inferred"] == masks  # whether the model found its tumour


def test_inference_counts_tell_nothing_of_the_one_unlabelled_case_at_the_site(guarded: tuple) -> None:
    sites, results = guarded
    result = _result(results, "small_counts")
    truths = _truths(sites)
    assert set(result["sites"]) == set(truths)
    for found in result["sites"].values():
        for key in ("n_segmented", "n_empty"):
            assert found[key] == 0 or found[key] == "<5" or found[key] >= 5, found
        assert found["inferred"] is None, found
    assert leaks(result, sites) == []


# ============================================================================================ the checker itself


def test_leaks_finds_ids_paths_values_and_exception_text(redteam_sites: list[Path]) -> None:
    truth = site_truth(redteam_sites[0])
    pid = str(truth.clinical.index[3])
    age = float(truth.clinical["age"].iloc[2])
    cell = float(truth.features.iloc[1, 2])
    answer = {"a": f"no mask for {pid}", "b": [1.0, age], "c": np.array([cell]),
              "d": f"{truth.root}/derived", "e": "KeyError: 'x'", "f": f"level age={age:g}"}
    found = leaks(answer, redteam_sites)
    assert len(found) == 6, found
    honest = {"n": PATIENTS, "mean": truth.features.mean().to_numpy(), "times": [7.0, 14.0, 350.0],
              "error": "site refuses: policy rule 'min_cohort': pool fewer groups"}
    assert leaks(honest, redteam_sites) == []


def test_reply_recorder_lists_fields_and_finds_leaks_after_the_handler(redteam_sites: list[Path],
                                                                       tmp_path: Path) -> None:
    import time

    from flwr.app import Context, Error, Message, Metadata, RecordDict
    from flwr.client.mod.utils import make_ffn

    from client.app import DATA_PATH_KEY, encode
    from simulations.engine import site_path_mod

    truth = site_truth(redteam_sites[1])
    cell = float(truth.features.iloc[0, 1])
    answers: dict[str, dict[str, object] | None] = {
        "query.honest": {"n": PATIENTS, "hist": np.arange(8.0), "w/conv": np.full(4, 0.25, np.float32)},
        "query.leaky": {"note": f"{truth.clinical.index[0]} ok", "mean": np.array([1.0, cell])},
        "query.refused": None}
    out = tmp_path / "replies"

    def handler(msg: Message, context: Context) -> Message:
        assert context.node_config[DATA_PATH_KEY]  # set by site_path_mod before the handler
        payload = answers[msg.metadata.message_type]
        if payload is None:
            return Message(Error(code=403, reason=f"refused at {truth.root}"), reply_to=msg)
        return Message(encode(payload), reply_to=msg)

    mods = [site_path_mod(redteam_sites), curious.reply_recorder(out)]
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    call = make_ffn(handler, mods)  # as Flower's ClientApp composes its mods: the first one outermost
    for kind in answers:
        meta = Metadata(run_id=1, message_id=f"id-{kind}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600.0, message_type=kind)
        call(Message(metadata=meta, content=RecordDict()), context)  # type: ignore[call-overload]
    records = {r["type"]: r for r in curious.read_replies(out)}
    assert set(records) == set(answers) and {r["node"] for r in records.values()} == {7}
    assert records["query.honest"]["leaks"] == [] and not records["query.honest"]["error"]
    assert records["query.honest"]["fields"] == {
        "n": {"kind": "int"}, "hist": {"kind": "array", "dtype": "float64", "shape": [8]},
        "w/conv": {"kind": "array", "dtype": "float32", "shape": [4]}}
    assert len(records["query.leaky"]["leaks"]) == 2, records["query.leaky"]
    assert records["query.refused"]["error"] and records["query.refused"]["code"] == 403
    assert ["site path" in line for line in records["query.refused"]["leaks"]] == [True]
