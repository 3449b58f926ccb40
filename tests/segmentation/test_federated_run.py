"""A federated segmentation study through Flower's simulation engine (2 sites, 2 rounds, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.segmentation.conftest import tiny_study, write_study


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
