"""Benchmark: radiomics cases per minute with 1 and 2 workers on 64^3 phantoms, ours next to pyradiomics' own
command-line batch mode on the same cases and settings (a ratio).

A case is one patient with both sequences (T2w, CET1): 2 x 107 features. Three runs per worker count:

* ``fedbiopsy extract`` (our command line, in a subprocess: interpreter start-up and imports included),
* ``pyradiomics cases.csv -p params.yaml -j N`` (pyradiomics' batch mode, same start-up costs),
* :func:`client.features.table.extract_cases` in this process (no start-up), for reference.

Both tools get the same pyradiomics settings (the study's defaults, one bin width for both sequences so that one
pyradiomics parameter file serves) and their values are checked to agree. Run::

    .venv/bin/python -m simulations.bench_radiomics --cases 6
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

log = logging.getLogger("bench_radiomics")
SEQUENCES = ("T2w", "CET1")
SPACING = (1.1, 1.1, 1.25)


def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else (shutil.which(name) or name)


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0,):
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6, help="patients (each with T2w and CET1)")
    parser.add_argument("--size", type=int, default=64, help="volume edge in voxels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest counts "
                        "(robust to other load on the machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from client.features.table import extract_cases, read_feature_table
    from common.features.settings import load_radiomics_settings
    from common.validation import load_site
    from simulations.phantoms import simulate_sites

    with tempfile.TemporaryDirectory(prefix="bench-radiomics-") as tmp_name:
        tmp = Path(tmp_name)
        [site_dir] = simulate_sites(tmp / "sites", sites=1, patients=args.cases, size=args.size, seed=args.seed)
        site = load_site(site_dir)
        default = load_radiomics_settings()
        shared = {**default.setting, "binWidth": default.for_sequence("T2w")["binWidth"]}
        bench = default.model_copy(update={"setting": shared, "sequences": {}})
        settings_file = tmp / "settings.yaml"
        settings_file.write_text(yaml.safe_dump(bench.model_dump(mode="json")))
        params = bench.for_sequence("T2w", SPACING)
        image_types, classes = params.pop("imageType"), params.pop("featureClass")
        params_file = tmp / "params.yaml"
        params_file.write_text(yaml.safe_dump({"setting": params, "imageType": image_types,
                                               "featureClass": classes}))
        batch = tmp / "cases.csv"
        with open(batch, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["ID", "Image", "Mask"])
            for case in sorted(site.cases, key=lambda c: c.patient_id):
                for seq in SEQUENCES:
                    writer.writerow([f"{case.patient_id}:{seq}", case.images[seq], case.mask])
        n = len(site.cases)
        rows = []
        for workers in args.workers:
            ours_csv, theirs_csv = tmp / f"ours-{workers}.csv", tmp / f"pyradiomics-{workers}.csv"
            cli = [_bin("fedbiopsy"), "extract", str(site_dir), "--out", str(ours_csv), "--workers", str(workers),
                   "--settings", str(settings_file), "--spacing", ",".join(map(str, SPACING))]
            pyr = [_bin("pyradiomics"), str(batch), "-p", str(params_file), "-o", str(theirs_csv), "-f", "csv",
                   "-j", str(workers), "--verbosity", "1"]
            t_cli, t_pyr, t_lib = float("inf"), float("inf"), float("inf")
            for _ in range(max(1, args.repeat)):  # interleaved, so that load changes hit all three alike
                t_cli = min(t_cli, _timed(cli))
                theirs_csv.unlink(missing_ok=True)  # pyradiomics appends to its output file
                t_pyr = min(t_pyr, _timed(pyr))
                start = time.perf_counter()
                table = extract_cases(site.cases, SEQUENCES, bench, SPACING, workers=workers)
                t_lib = min(t_lib, time.perf_counter() - start)
            ours = read_feature_table(ours_csv)
            theirs = pd.read_csv(theirs_csv, float_precision="round_trip").set_index("ID")
            worst = 0.0
            for pid in ours.index:
                for seq in SEQUENCES:
                    a = ours.loc[pid, [c for c in ours.columns if c.startswith(f"{seq}_")]].to_numpy(float)
                    names = [c.removeprefix(f"{seq}_") for c in ours.columns if c.startswith(f"{seq}_")]
                    b = theirs.loc[f"{pid}:{seq}", names].to_numpy(float)
                    worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))))
            if table.frame.shape != ours.shape:
                raise RuntimeError(f"the CLI's table {ours.shape} differs from the in-process one {table.frame.shape}")
            rows.append((workers, 60 * n / t_cli, 60 * n / t_pyr, 60 * n / t_lib, worst))
        print(f"\n{n} cases ({args.size}^3, T2w+CET1, 2 x 107 features, resampled to {SPACING} mm), "
              f"best of {args.repeat}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPU(s)")
        print(f"{'workers':>7} {'fedbiopsy CLI':>14} {'pyradiomics CLI':>16} {'ratio':>6} {'in-process':>11} "
              f"{'max rel diff':>13}   (cases/min)")
        for workers, ours_rate, theirs_rate, lib_rate, worst in rows:
            print(f"{workers:>7} {ours_rate:>14.1f} {theirs_rate:>16.1f} {ours_rate / theirs_rate:>6.2f} "
                  f"{lib_rate:>11.1f} {worst:>13.1e}")
        if len(rows) > 1:
            print(f"speed-up {rows[0][0]} -> {rows[-1][0]} workers: fedbiopsy CLI x{rows[-1][1] / rows[0][1]:.2f}, "
                  f"pyradiomics CLI x{rows[-1][2] / rows[0][2]:.2f}, in-process x{rows[-1][3] / rows[0][3]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
