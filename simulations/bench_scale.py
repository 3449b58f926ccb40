"""Benchmark: the statistics phases over many virtual sites in Flower's simulation engine.

    python -m simulations.bench_scale [--sites 10 30 100] [--patients 6] [--size 16] [--features 0]
                                      [--cpus-per-site 1.0] [--flower-polling]

For each site count, in a fresh process: simulate tiny hospitals (``--patients`` cases of ``--size``^3 voxels),
write each site's ``derived/features.csv`` (``--features 0``: the tumour features of
:mod:`simulations.tumour_signature` measured from the images; ``N > 0``: N columns of
:mod:`simulations.synthetic_features`), then run the study ``rollcall (warm-up) -> fingerprint ->
harmonisation -> reduction -> outcomes`` through :func:`simulations.engine.run_simulated_study`. The sites
allow exact outcomes, so k-means and survival are the exact protocol. The roll call absorbs the engine's
start and the ClientApp actors' imports and first load of each site, so that the phases after it show
their own cost.

Prints, per site count and phase: the wall time; the query rounds (each Federation.send), their mean and max
time; the CPU seconds and peak RSS sampled every 0.2 s from ``/proc`` of the driver process (ServerApp,
SuperLink, the engine's threads and Ray's core) and of the Ray ``ray::*`` workers (the ClientApp actors,
summed); then the ratios to the first site count. CPU seconds are the figure to compare on a busy machine.
``--flower-polling`` keeps Flower's own message pick-up instead of :mod:`simulations.vce_polling`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

PHASES = ("rollcall", "fingerprint", "harmonisation", "reduction", "outcomes")
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


# --- memory sampling over /proc (no psutil needed) -------------------------------------------------------------

def _proc_table() -> dict[int, tuple[int, str, float, float]]:
    """pid -> (parent pid, command line, RSS in MB, CPU seconds so far) of every readable process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        out[int(entry)] = (int(fields[1]), cmd, int(fields[21]) * _PAGE_MB,
                           (int(fields[11]) + int(fields[12])) * _TICK_S)
    return out


def _descendants(table: dict[int, tuple[int, str, float, float]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Sample:
    t: float
    driver_mb: float
    workers_mb: float  # sum over ray::* processes (RSS counts shared pages in each)
    n_workers: int
    ray_other_mb: float  # raylet, GCS, log monitor, ...
    driver_cpu_s: float = 0.0  # CPU seconds so far (all threads)
    workers_cpu_s: float = 0.0  # summed over the ray::* processes alive at the sample


class MemorySampler(threading.Thread):
    """Samples the driver's and its descendant processes' RSS every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.is_set():
            table = _proc_table()
            workers = other = workers_cpu = 0.0
            n_workers = 0
            for pid in _descendants(table, me):
                _, cmd, rss, cpu = table[pid]
                if cmd.startswith("ray::"):
                    workers += rss
                    workers_cpu += cpu
                    n_workers += 1
                else:
                    other += rss
            _, _, driver_rss, driver_cpu = table.get(me, (0, "", 0.0, 0.0))
            self.samples.append(Sample(time.perf_counter(), driver_rss, workers, n_workers, other, driver_cpu,
                                       workers_cpu))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def cpu(self, start: float, end: float) -> tuple[float, float]:
        """CPU seconds of the driver and of the ray workers between the samples nearest ``start`` and ``end``."""
        if not self.samples:
            return float("nan"), float("nan")
        first = min(self.samples, key=lambda s: abs(s.t - start))
        last = min(self.samples, key=lambda s: abs(s.t - end))
        return last.driver_cpu_s - first.driver_cpu_s, last.workers_cpu_s - first.workers_cpu_s

    def peak(self, start: float = float("-inf"), end: float = float("inf")) -> Sample:
        """The per-column maxima over the samples in ``[start, end]`` (the nearest sample if none falls in it)."""
        inside = [s for s in self.samples if start <= s.t <= end]
        if not inside and self.samples:
            inside = [min(self.samples, key=lambda s: abs(s.t - start))]
        if not inside:
            return Sample(start, 0.0, 0.0, 0, 0.0)
        return Sample(start, max(s.driver_mb for s in inside), max(s.workers_mb for s in inside),
                      max(s.n_workers for s in inside), max(s.ray_other_mb for s in inside))


# --- timing of phases (the study's log) and rounds (every Federation.send) ----------------------------------

@dataclass
class Timeline:
    phases: dict[str, list[float]] = field(default_factory=dict)  # phase -> [start, end]
    rounds: list[tuple[str, str, float, float]] = field(default_factory=list)  # (phase, action, start, end)
    current: str = ""


class _PhaseLog(logging.Handler):
    def __init__(self, timeline: Timeline) -> None:
        super().__init__(logging.INFO)
        self.timeline = timeline

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "phase %s: start":
            self.timeline.current = str(record.args[0])  # type: ignore[index]
            self.timeline.phases[self.timeline.current] = [time.perf_counter(), float("nan")]
        elif record.msg == "phase %s: done; registered %s":
            self.timeline.phases[str(record.args[0])][1] = time.perf_counter()  # type: ignore[index]


@contextmanager
def instrumented(timeline: Timeline) -> Iterator[Timeline]:
    """Record the start/end of every phase and every query round of the server (restored on exit)."""
    from server.federation import Federation, QueryResult

    original = Federation.send

    def timed_send(self: Federation, action: str, *args: Any, **kwargs: Any) -> QueryResult:
        start = time.perf_counter()
        try:
            return original(self, action, *args, **kwargs)
        finally:
            timeline.rounds.append((timeline.current, action, start, time.perf_counter()))

    Federation.send = timed_send  # type: ignore[method-assign]
    handler = _PhaseLog(timeline)
    server_log = logging.getLogger("fedbiopsy.server")
    level = server_log.level
    server_log.setLevel(logging.INFO)
    server_log.addHandler(handler)
    try:
        yield timeline
    finally:
        server_log.removeHandler(handler)
        server_log.setLevel(level)
        Federation.send = original  # type: ignore[method-assign]


# --- the simulated sites and the study -----------------------------------------------------------------------

def make_sites(root: Path, n_sites: int, patients: int, size: int, n_features: int, seed: int = 0) -> list[Path]:
    """Tiny simulated hospitals with ``derived/features.csv``, allowing exact outcomes; returns their folders."""
    import pandas as pd

    from common.sitedata import load_site_config, write_site_config
    from simulations.phantoms import simulate_sites
    from simulations.tumour_signature import tumour_features

    dirs = simulate_sites(root, sites=n_sites, patients=patients, size=size, seed=seed)
    if n_features > 0:
        from simulations.synthetic_features import synthetic_feature_sites

        tables = list(synthetic_feature_sites([patients] * n_sites, n_features, seed=seed)[0].values())
    for i, site_dir in enumerate(dirs):
        config = load_site_config(site_dir)
        write_site_config(config.model_copy(update={"policy": config.policy.model_copy(
            update={"exact_outcomes": True})}), site_dir)
        ids = pd.read_csv(site_dir / "clinical.csv", dtype={"patient_id": str})["patient_id"]
        table = (tables[i].set_axis(pd.Index(ids, name="patient_id"), axis=0) if n_features > 0
                 else tumour_features(site_dir))
        (site_dir / "derived").mkdir(exist_ok=True)
        table.to_csv(site_dir / "derived" / "features.csv")
    return dirs


def study_yaml(n_sites: int, phases: tuple[str, ...] = PHASES, n_factors: int = 2,
               outcomes: str = "{k: 2, time_bin_days: 30.0, seed: 1}") -> str:
    """The benchmark's study over ``n_sites`` sites: the statistics phases, a generous round timeout."""
    return (f"name: bench-scale-{n_sites}\nphases: [{', '.join(phases)}]\nmin_sites: {n_sites}\n"
            "round_timeout_s: 900\nfingerprint: {foreground_samples_per_case: 200}\n"
            f"reduction: {{n_factors: {n_factors}, correlation_threshold: 0.95}}\noutcomes: {outcomes}\n")


def run_once(n_sites: int, patients: int, size: int, n_features: int, cpus_per_site: float,
             flower_polling: bool = False) -> dict:
    """Simulate ``n_sites`` sites, run the study over them in the simulation engine; returns the measurements."""
    import simulations.engine as engine
    from common.config import load_study_config

    if flower_polling:  # Flower's own message pick-up, for comparison (simulations/vce_polling.py)
        engine.indexed_message_polling = lambda: nullcontext(False)  # type: ignore[assignment,return-value]
    with tempfile.TemporaryDirectory(prefix=f"bench-scale-{n_sites}-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        dirs = make_sites(root / "sites", n_sites, patients, size, n_features)
        setup = time.perf_counter() - start
        study_path = root / "study.yaml"
        study_path.write_text(study_yaml(n_sites))
        study = load_study_config(study_path)
        timeline = Timeline()
        sampler = MemorySampler()
        sampler.start()
        start = time.perf_counter()
        try:
            with instrumented(timeline):
                summary = engine.run_simulated_study(study, study_path, dirs, root / "out",
                                                     cpus_per_site=cpus_per_site)
        finally:
            total = time.perf_counter() - start
            sampler.stop()
    harm, out = summary["outputs"].get("harmonisation", {}), summary["outputs"].get("outcomes", {})
    stats = [p for p in PHASES if p != "rollcall"]
    start_stats = timeline.phases[stats[0]][0]
    peak = sampler.peak(start_stats, float("inf"))
    return {
        "sites": n_sites, "setup_s": setup, "total_s": total, "phases": phase_rows(timeline, sampler),
        "statistics_peak": {"driver_mb": peak.driver_mb, "workers_mb": peak.workers_mb,
                            "n_workers": peak.n_workers, "ray_other_mb": peak.ray_other_mb},
        "rounds": [{"phase": p, "action": a, "s": e - s} for p, a, s, e in timeline.rounds],
        "check": {"combat_cases": harm.get("n_cases"), "combat_batches": len(harm.get("batches", {})),
                  "kmeans_iterations": out.get("kmeans", {}).get("n_iter"),
                  "logrank_p": (out.get("logrank") or {}).get("p_value")},
    }


# --- report --------------------------------------------------------------------------------------------------

def phase_rows(timeline: Timeline, sampler: MemorySampler) -> dict[str, dict[str, float]]:
    """Per phase: wall s, rounds, mean/max round s, driver/worker CPU s, peak driver/worker RSS MB."""
    rows = {}
    for phase in PHASES:
        start, end = timeline.phases.get(phase, [float("nan"), float("nan")])
        rounds = [r[3] - r[2] for r in timeline.rounds if r[0] == phase]
        peak = sampler.peak(start, end)
        driver_cpu, workers_cpu = sampler.cpu(start, end)
        rows[phase] = {"wall_s": end - start, "rounds": len(rounds),
                       "mean_round_s": sum(rounds) / len(rounds) if rounds else float("nan"),
                       "max_round_s": max(rounds, default=float("nan")),
                       "driver_cpu_s": driver_cpu, "workers_cpu_s": workers_cpu,
                       "driver_mb": peak.driver_mb, "workers_mb": peak.workers_mb, "n_workers": peak.n_workers}
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def print_report(runs: list[dict], cpus_per_site: float, flower_polling: bool) -> None:
    """One row per site count and phase, one 'statistics' row per site count, ratios to the first count."""
    base = runs[0]["phases"]
    print(f"\n{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}; Ray client_resources num_cpus = "
          f"{cpus_per_site:g}; message pick-up: {'Flower' if flower_polling else 'indexed (vce_polling)'}")
    head = (f"{'sites':>5} {'phase':<14} {'wall s':>7} {'rounds':>6} {'round s':>7} {'max rnd':>7} {'drv cpu':>7} "
            f"{'wkr cpu':>7} {'drv MB':>6} {'wkr MB':>6} {'wkrs':>4} {'x wall':>6} {'x round':>7} {'x cpu':>6} "
            f"{'x drvMB':>7}")
    print(head)
    print("-" * len(head))
    stats = [p for p in PHASES if p != "rollcall"]
    for run in runs:
        rows = run["phases"]
        for phase, row in rows.items():
            b = base[phase]
            cpu, b_cpu = row["driver_cpu_s"] + row["workers_cpu_s"], b["driver_cpu_s"] + b["workers_cpu_s"]
            print(f"{run['sites']:>5} {phase:<14} {row['wall_s']:>7.2f} {row['rounds']:>6} "
                  f"{row['mean_round_s']:>7.3f} {row['max_round_s']:>7.3f} {row['driver_cpu_s']:>7.1f} "
                  f"{row['workers_cpu_s']:>7.1f} {row['driver_mb']:>6.0f} {row['workers_mb']:>6.0f} "
                  f"{row['n_workers']:>4} {_ratio(row['wall_s'], b['wall_s']):>6.2f} "
                  f"{_ratio(row['mean_round_s'], b['mean_round_s']):>7.2f} {_ratio(cpu, b_cpu):>6.2f} "
                  f"{_ratio(row['driver_mb'], b['driver_mb']):>7.2f}")
        wall = sum(rows[p]["wall_s"] for p in stats)
        n_rounds = sum(rows[p]["rounds"] for p in stats)
        peak = run["statistics_peak"]
        base_wall = sum(base[p]["wall_s"] for p in stats)
        print(f"{run['sites']:>5} {'statistics':<14} {wall:>7.2f} {n_rounds:>6} {wall / max(n_rounds, 1):>7.3f} "
              f"{'':>7} {sum(rows[p]['driver_cpu_s'] for p in stats):>7.1f} "
              f"{sum(rows[p]['workers_cpu_s'] for p in stats):>7.1f} {peak['driver_mb']:>6.0f} "
              f"{peak['workers_mb']:>6.0f} {peak['n_workers']:>4} {_ratio(wall, base_wall):>6.2f}  "
              f"(whole run {run['total_s']:.1f} s; raylet+GCS {peak['ray_other_mb']:.0f} MB)")
    print(f"""
round s: mean query round (send, site steps, replies); drv/wkr cpu: CPU seconds of the driver (ServerApp,
SuperLink, engine threads, Ray's core, this sampler) and of the ray::* workers (the ClientApp actors);
MB: peak RSS (worker RSS summed, shared pages counted in each); x: ratio to the same phase at {runs[0]['sites']} sites.
'rollcall' is the warm-up (engine start-up, actor imports, first load of every site); 'statistics' sums
fingerprint, harmonisation, reduction and outcomes. Each site count runs in a fresh process.""")
    for run in runs:
        c = run["check"]
        print(f"{run['sites']:>5} sites: ComBat {c['combat_cases']} cases, {c['combat_batches']} batches; k-means "
              f"{c['kmeans_iterations']} iterations; log-rank p = {c['logrank_p']:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--patients", type=int, default=6, help="per site; at least the policy's min_cohort (5)")
    parser.add_argument("--size", type=int, default=16, help="voxels per side of the simulated volumes")
    parser.add_argument("--features", type=int, default=0,
                        help="0: tumour features measured from the images; N: N synthetic feature columns")
    parser.add_argument("--cpus-per-site", type=float, default=1.0,
                        help="Ray client_resources num_cpus (actors = CPUs / this)")
    parser.add_argument("--flower-polling", action="store_true",
                        help="keep Flower's own message pick-up (nodes x messages per pass), for comparison")
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # one site count, measurements to this file
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    if args.json:
        result = run_once(args.sites[0], args.patients, args.size, args.features, args.cpus_per_site,
                          args.flower_polling)
        args.json.write_text(json.dumps(result))
        return
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for n in args.sites:  # a fresh process per count: no memory or warm caches carried over
            print(f"running {n} sites x {args.patients} patients ({args.size}^3) ...", flush=True)
            out = Path(tmp) / f"{n}.json"
            cmd = [sys.executable, "-m", "simulations.bench_scale", "--sites", str(n), "--patients",
                   str(args.patients), "--size", str(args.size), "--features", str(args.features),
                   "--cpus-per-site", str(args.cpus_per_site), "--json", str(out)]
            if args.flower_polling:
                cmd.append("--flower-polling")
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
            if done.returncode != 0 or not out.is_file():
                print(done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"the run with {n} sites failed (exit {done.returncode})")
            runs.append(json.loads(out.read_text()))
            print(f"  done in {runs[-1]['total_s']:.1f} s", flush=True)
    print_report(runs, args.cpus_per_site, args.flower_polling)


if __name__ == "__main__":
    main()
