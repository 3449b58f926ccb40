"""Benchmark: the harmonisation-effect experiment's table (AUC / accuracy per condition, pooled and per site).

    .venv/bin/python -m simulations.bench_harmonisation [--patients 40] [--seed 0] [--workers 2] [--out DIR]

Prints the Markdown table, the worst-group gaps, the pooled AUC gain of each condition over no harmonisation
(as a difference and a ratio) and the time of each stage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def main(argv: list[str] | None = None) -> int:
    """Run the experiment and print its table, gains, gaps and times."""
    from common.config import DEFAULT_STUDY, load_study_config
    from simulations.experiment_harmonisation import markdown_table, run_harmonisation_experiment

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_STUDY.with_name("harmonisation.yaml"))
    parser.add_argument("--patients", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    base = load_study_config(args.config)
    changes = {k: v for k, v in {"patients": args.patients, "seed": args.seed, "workers": args.workers}.items()
               if v is not None}
    study = load_study_config(args.config, experiment={**base.experiment.model_dump(mode="json"), **changes}) \
        if changes else base
    out = args.out or Path(tempfile.mkdtemp(prefix="fedbiopsy-harmonisation-"))
    t0 = time.perf_counter()
    result = run_harmonisation_experiment(study, out)
    total = time.perf_counter() - t0
    e = study.experiment
    w = sys.stdout.write
    w(f"# harmonisation experiment: {e.sites} sites x {e.patients} patients, {e.size}^3, seed {e.seed}, "
      f"model {e.model}, image standardisation {e.image_standardisation}\n\n")
    w(markdown_table(result.rows, groups=["pooled", "site", "field_strength"]))
    base_auc = result.pooled("none", "auc") if "none" in e.conditions else float("nan")
    w("\npooled AUC vs no harmonisation:\n")
    for cond in e.conditions:
        auc = result.pooled(cond, "auc")
        w(f"  {cond:7s} AUC {auc:.3f}  accuracy {result.pooled(cond, 'accuracy'):.3f}  "
          f"gain {auc - base_auc:+.3f}  ratio {auc / base_auc:.2f}\n")
    w("\nworst-group gaps (field strength):\n")
    for name, summary in result.summaries.items():
        gaps = summary["fairness"].get("field_strength", {}).get("worst_group_gap", {})
        w(f"  {name:7s} " + "  ".join(f"{m} {g['gap']:.3f} (worst {g['worst']})" for m, g in gaps.items()
                                      if m in ("auc", "accuracy")) + "\n")
    w("\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()) + f", total {total:.1f}\n")
    w(f"files: {result.files}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
