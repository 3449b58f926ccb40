"""A federated segmentation study through Flower's simulation engine (2 sites, 2 rounds, CPU), and the same
driver over in-memory sites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.segmentation.conftest import site_query, tiny_study, write_study

AGGREGATE = {"n_cases": 16, "spacing_median": [1.1, 1.1, 1.25], "shape_median": [32, 32, 32],
             "intensity": {s: {"mean": 500.0, "std": 100.0, "min": 0.0, "max": 1000.0,
                               "percentiles": {"p0.5": 10.0, "p50": 500.0, "p99.5": 990.0}}
                           for s in ("T2w", "CET1")}}


def test_two_rounds_two_sites_improve_dsc(tmp_path: Path, seg_sites: list[Path]) -> None:
    from simulations.engine import run_simulated_study

    study = tiny_study()
    summary = run_simulated_study(study, write_study(study, tmp_path / "study.yaml"), seg_sites, tmp_path / "out")
    seg = summary["outputs"]["segmentation"]

    # Every site trained in both rounds and nothing was rejected.
    assert summary["participants"]["segmentation"] == {"site-001": 5, "site-002": 5}
    for view in seg["rounds"][1:]:
        assert set(view["train"]) == {"site-001", "site-002"}
        assert view["rejected"] == [] and view["errors"] == []
        assert set(view["sites"]) == {"site-001", "site-002"}
    # The federated model segments far better than the initial one.
    assert seg["initial_dsc_median"] < 0.2
    assert seg["final_dsc_median"] > seg["initial_dsc_median"] + 0.25
    pooled = seg["rounds"][-1]["pooled"]
    assert pooled["dsc"]["n"] == 6 and 0.0 <= pooled["fpr"]["median"] and pooled["hd95"]["n"] >= 1

    # Artifacts: the plan and one segmentation model per round, loadable, with per-site and pooled metrics.
    kinds = [(a["kind"], a["round"]) for a in seg["artifacts"]]
    assert kinds == [("plan", None), ("segmentation", 1), ("segmentation", 2)]
    last = seg["artifacts"][-1]
    assert set(last["metrics"]) == {"site-001", "site-002", "pooled"}
    final = np.load(seg["final_model"])
    round2 = np.load(last["path"])
    assert set(final.files) == set(round2.files)
    assert all(np.array_equal(final[k], round2[k]) for k in final.files)
    plan = json.loads(Path(seg["plan"]).read_text())
    assert plan["network"] == "monai" and plan["patch_size"] == [32, 32, 32]
    # Overlays stay at the site.
    assert list((seg_sites[0] / "derived" / "segmentation").glob("overlays-*/*.png"))


def test_the_driver_over_in_memory_sites_trains_evaluates_and_segments(seg_sites: list[Path]) -> None:
    """The same driver the ServerApp runs, over the same site steps, without Flower: one round of FedAvg."""
    from common.segmentation.inference import run_inference
    from common.segmentation.networks import build_network, get_weights
    from common.segmentation.plan import make_plan
    from common.segmentation.protocol import COHORT, EVALUATE, TRAIN, run_segmentation
    from server.strategies import make_aggregate

    study = tiny_study(rounds=1, steps_per_epoch=5, overlays=0)
    plan = make_plan(AGGREGATE, study)
    initial = get_weights(build_network(plan, seed=0))
    query = site_query(seg_sites, study)
    run = run_segmentation(query, plan, initial, study.segmentation, make_aggregate(study.segmentation),
                           min_sites=2)

    assert query.actions == [COHORT, EVALUATE, TRAIN, EVALUATE]
    assert run.cohort == {s: {"n_train": 5, "n_heldout": 3} for s in ("site-001", "site-002")}
    (record,) = run.rounds[1:]
    assert set(record.train) == {"site-001", "site-002"} and record.rejected == [] and record.errors == []
    assert all(m["num-examples"] == 5 and np.isfinite(m["train-loss"]) for m in record.train.values())
    assert record.pooled["dsc"]["n"] == 6 and set(record.evaluate) == {"site-001", "site-002"}
    assert set(run.weights) == set(initial) and any(not np.array_equal(run.weights[k], initial[k]) for k in initial)
    # The inference protocol over the same sites: these have no unlabelled case, so nothing is segmented.
    counts = run_inference(query, run.weights, plan)
    assert counts.segmented == counts.empty == {"site-001": 0, "site-002": 0}
