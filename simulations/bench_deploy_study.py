"""Benchmark: the whole default study on Flower's deployment engine against its simulation engine, same sites.

    python -m simulations.bench_deploy_study [--sites 2] [--insecure] [--config study.yaml]

Simulates the study's hospitals once, copies them twice (a study leaves state at a site: release ledgers,
derived tables), then runs the study (1) as ``fedbiopsy study run`` does (simulation engine, Ray actors) and
(2) as ``fedbiopsy deploy local --sites N --tls`` does (a SuperLink, one authenticated SuperNode per site with
its own site SuperExec, ``flwr run``), one after the other in this process. Both wall times include their
engine's start-up; the ratio deployment/simulation is the issue's target (at most 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def _phase_seconds(result_dir: Path) -> dict[str, float]:
    study = json.loads((result_dir / "study.json").read_text())
    return {str(k): round(float(v), 1) for k, v in study.get("phase_seconds", {}).items()}


def main(argv: list[str] | None = None) -> None:
    """Print both wall times and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--insecure", action="store_true", help="deployment without TLS / node authentication")
    parser.add_argument("--config", type=Path, default=None, help="study YAML (default: the packaged demo study)")
    parser.add_argument("--keep", type=Path, default=None, help="keep sites, logs and results in this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from common.config import DEFAULT_STUDY, load_study_config
    from deploy.local import LocalFederation
    from simulations.engine import run_simulated_study
    from simulations.phantoms import simulate_sites

    study_path = (args.config or DEFAULT_STUDY).resolve()
    study = load_study_config(study_path)
    sim = study.simulation
    with tempfile.TemporaryDirectory(prefix="bench-deploy-study-") as tmp:
        root = args.keep or Path(tmp)
        made = simulate_sites(root / "sites", sites=args.sites, patients=sim.patients, size=sim.size, seed=sim.seed,
                              unlabelled=sim.unlabelled, raters=sim.raters,
                              rated_fraction=sim.rated_fraction)
        copies = {}
        for engine in ("simulation", "deployment"):
            shutil.rmtree(root / engine, ignore_errors=True)
            copies[engine] = [Path(shutil.copytree(s, root / engine / "sites" / s.name)) for s in made]

        start = time.perf_counter()
        run_simulated_study(study, study_path, copies["simulation"], root / "simulation" / "study")
        sim_s = time.perf_counter() - start

        start = time.perf_counter()
        with LocalFederation(copies["deployment"], root / "deployment" / "work", tls=not args.insecure) as fed:
            up_s = time.perf_counter() - start
            outcome = fed.run_study(study_path, root / "deployment" / "study", timeout_s=3600)
        dep_s = time.perf_counter() - start
        if not outcome.completed:
            tail = "\n".join(outcome.log_lines[-30:])
            raise SystemExit(f"the deployed study did not complete: {outcome.status}\n{tail}")
        sim_phases = _phase_seconds(root / "simulation" / "study")
        dep_phases = _phase_seconds(root / "deployment" / "study")

    mode = "TLS + node authentication" if not args.insecure else "insecure"
    print(f"default study {study.name!r}, {args.sites} sites x {sim.patients} patients, cpu count {os.cpu_count()}")
    print(f"simulation engine (fedbiopsy study run)          : {sim_s:7.1f} s  phases {sim_phases}")
    print(f"deployment engine (fedbiopsy deploy local, {mode}): {dep_s:7.1f} s  (federation up {up_s:.1f} s, "
          f"run {outcome.seconds:.1f} s)  phases {dep_phases}")
    print(f"wall-time ratio deployment/simulation: {dep_s / sim_s:.2f}x (target <= 2)")


if __name__ == "__main__":
    main()
