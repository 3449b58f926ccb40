"""Benchmark of site preprocessing: per-case time and the speed-up of 2 worker processes over 1.

``python -m simulations.bench_preprocessing [--patients 8] [--size 48]`` simulates one hospital (the noisy 1.5T
scanner), learns its site-local plan once (not timed), then preprocesses the cohort with that plan with 1 and
with 2 workers (the default pipeline: NLM, N4, registration, resampling, Nyúl). The machine's load average is
printed too: on a shared machine the ratio is only as good as the cores that were free.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    from client.preprocessing.cohort import preprocess_site
    from common.config import load_study_config
    from common.plan import load_plan
    from simulations.phantoms import write_site

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--site-index", type=int, default=1, help="0-based simulated site (1: the 1.5T GE)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    study = load_study_config()
    with tempfile.TemporaryDirectory(prefix="bench-pre-") as tmp:
        root = Path(tmp)
        site = write_site(root / "sites", args.site_index, args.patients, size=args.size, seed=0, write_truth=False)
        warm = preprocess_site(site, root / "warm", study, workers=2)
        plan = load_plan(root / "warm" / "plan.json")
        rows = {}
        for workers in (1, 2):
            load = os.getloadavg()[0]
            start = time.perf_counter()
            report = preprocess_site(site, root / f"w{workers}", study, plan, workers=workers)
            wall = time.perf_counter() - start
            if report.failed:
                raise SystemExit(f"cases failed: {report.failed}")
            per_case = sum(o.seconds for o in report.completed.values()) / len(report.completed)
            rows[workers] = (wall, per_case, load)
    print(f"site preprocessing benchmark: {args.patients} cases of {args.size}^3, 2 sequences, "  # noqa: T201
          f"steps {list(study.preprocessing.steps)}, {os.cpu_count()} CPU(s); plan learnt in {warm.seconds:.1f} s")
    print(f"{'workers':>8} {'wall s':>8} {'s/case':>8} {'cases/min':>10} {'load avg':>9}")  # noqa: T201
    for workers, (wall, per_case, load) in rows.items():
        print(f"{workers:>8} {wall:>8.2f} {per_case:>8.2f} {60 * args.patients / wall:>10.1f} {load:>9.2f}")  # noqa: T201
    print(f"speed-up of 2 workers over 1: {rows[1][0] / rows[2][0]:.2f}x")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
