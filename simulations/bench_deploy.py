"""Benchmark: per-round overhead of Flower's deployment engine vs its simulation engine, same tiny query.

    python -m simulations.bench_deploy [--sites 2] [--rounds 5] [--insecure]

Runs the same study (``rollcall``: every site answers its case count, no image is read) over the same
simulated sites (1) in the simulation engine (Ray actors in one process) and (2) on a real local deployment
(``flower-superlink`` + one ``flower-supernode`` per site, TLS + node authentication by default, submitted with
``flwr run``). A round's time is measured inside the ServerApp (``rollcall-rounds.jsonl``), so both engines are
timed by the same code; start-up (Ray, or the SuperLink, registration and SuperNodes) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def _round_seconds(result_dir: Path) -> list[float]:
    lines = (result_dir / "rollcall-rounds.jsonl").read_text().splitlines()
    return [float(json.loads(line)["seconds"]) for line in lines]


def main(argv: list[str] | None = None) -> None:
    """Print per-round times of both engines and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--insecure", action="store_true", help="deployment without TLS / node authentication")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from common.config import load_study_config
    from deploy.local import LocalFederation
    from simulations.engine import run_simulated_study
    from simulations.phantoms import simulate_sites

    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        root = Path(tmp)
        sites = simulate_sites(root / "sites", sites=args.sites, patients=6, size=32, seed=0)
        study_path = root / "study.yaml"
        study_path.write_text(yaml.safe_dump({"name": "bench-deploy", "phases": ["rollcall"], "min_sites": args.sites,
                                              "round_timeout_s": 600, "rollcall": {"rounds": args.rounds}}))
        study = load_study_config(study_path)

        start = time.perf_counter()
        run_simulated_study(study, study_path, sites, root / "sim")
        sim_total = time.perf_counter() - start
        sim_rounds = _round_seconds(root / "sim")

        start = time.perf_counter()
        with LocalFederation(sites, root / "deploy", tls=not args.insecure) as fed:
            up = time.perf_counter() - start
            outcome = fed.run_study(study_path, root / "deployed", timeout_s=1800)
        dep_total = time.perf_counter() - start
        if not outcome.completed:
            raise SystemExit(f"the deployed run did not complete: {outcome.status}")
        dep_rounds = _round_seconds(root / "deployed")

    sim_med, dep_med = statistics.median(sim_rounds), statistics.median(dep_rounds)
    mode = "insecure" if args.insecure else "TLS + node auth"
    print(f"{args.sites} sites, {args.rounds} rounds of query.rollcall (cpu count {os.cpu_count()})")
    print(f"simulation engine : per round median {sim_med:7.3f} s  (rounds {[round(s, 2) for s in sim_rounds]}); "
          f"total with Ray start-up {sim_total:6.1f} s")
    print(f"deployment engine : per round median {dep_med:7.3f} s  (rounds {[round(s, 2) for s in dep_rounds]}); "
          f"federation up in {up:5.1f} s ({mode}), run {outcome.seconds:5.1f} s, total {dep_total:6.1f} s")
    print(f"per-round overhead ratio deployment/simulation: {dep_med / sim_med:6.1f}x "
          f"(+{dep_med - sim_med:.2f} s per round: polls, object transfers over HTTP, TLS)")
    print(f"end-to-end ratio deployment/simulation: {dep_total / sim_total:6.2f}x")


if __name__ == "__main__":
    main()
