"""Benchmark (not a test): Grad-CAM of the federated image classifier on the imaging chain, over seeds.

    python -m simulations.bench_gradcam                       # seeds 1 2 3, the default study's sizes
    python -m simulations.bench_gradcam --seeds 1 2 3 4 5 --image-rounds 10

For each seed, hospitals are simulated with the default study's sizes (``common/studies/default.yaml``) and the
study runs its fingerprint and preprocessing phases, then the classifier phase with the image model only, so
the model trains and is explained on the preprocessed crops (``classifier.json`` says ``inputs``). What the
sites released is read back: the held-out AUC (from score cells, coarse at these sizes; the exact one is scored
here too, which only a simulation can), and over the explained crops how often the Grad-CAM map peaks
inside the tumour, the map's mass inside it, and the tumour's share of the crop (the chance level of both).

Printed per seed and over all seeds: peak-in-tumour rate / chance, mass share / chance, the one-sided binomial
p-value of the peaks against chance, and the worst seed's margins. Localisation "above chance by a margin"
means every seed's peak ratio >= 1.5 with p < 0.01 and mass ratio >= 1.1 (the unit test's bounds,
``tests/classifier/test_image_gradcam.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

log = logging.getLogger("bench_gradcam")
HIT_FACTOR, MAX_P, MASS_FACTOR = 1.5, 0.01, 1.1


def _study(args: argparse.Namespace, seed: int):  # noqa: ANN202 - StudyConfig, imported lazily
    import yaml

    from common.config import StudyConfig

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "common" / "studies" / "default.yaml").read_text())
    raw["name"] = f"bench-gradcam-seed{seed}"
    raw["phases"] = ["fingerprint", "preprocessing", "classifier"]
    classifier = {**raw.get("classifier", {}), "models": ["image"]}
    if args.image_rounds:
        classifier["image_rounds"] = args.image_rounds
    raw["classifier"] = classifier
    return StudyConfig.model_validate(raw)


def _exact_auc(study, sites: list[Path], weights: Path) -> float:  # noqa: ANN001 - StudyConfig
    """The final image model's held-out AUC over every site's held-out crops, scored here (simulation only:
    the federation sees the sites' score cells, which merge at these cohort sizes)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from client.classifier.data import site_split, tumour_crops
    from client.steps.inputs import imaging_site
    from common.classifier.models import build_image_model, image_scores, load_weights
    from common.validation import load_site
    from common.weights import load_weights as read_weights

    net = build_image_model(len(study.sequences), study.classifier.image_channels)
    load_weights(net, read_weights(weights))
    scores, labels = [], []
    for d in sites:
        site = imaging_site(load_site(d), study)
        split = site_split(site, study)
        held = set(split.test)
        crops, _ = tumour_crops([c for c in site.cases if c.patient_id in held], study.sequences,
                                study.classifier.crop_size)
        scores.append(image_scores(net, crops))
        labels.append(split.labels.loc[[c.patient_id for c in site.cases if c.patient_id in held]].to_numpy())
    return float(roc_auc_score(np.concatenate(labels), np.concatenate(scores)))


def _one_seed(args: argparse.Namespace, seed: int) -> dict:
    import yaml
    from scipy.stats import binomtest

    from simulations.engine import run_simulated_study
    from simulations.phantoms import simulate_sites

    study = _study(args, seed)
    out = args.out / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    sim = study.simulation
    sites = simulate_sites(out / "sites", sites=sim.sites, patients=sim.patients, size=sim.size, seed=seed)
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False))
    t0 = time.perf_counter()
    run_simulated_study(study, path, sites, out / "results",
                        cpus_per_site=max(1.0, (os.cpu_count() or 1) / len(sites)))
    result = json.loads((out / "results" / "classifier.json").read_text())
    summary = result["models"]["image"]["summary"]
    cam = summary["gradcam"]
    hits = int(round(cam["peak_in_tumour"] * cam["n"]))
    p = float(binomtest(hits, int(cam["n"]), cam["chance"], alternative="greater").pvalue)
    return {"seed": seed, "inputs": result.get("inputs"), "auc": summary["pooled"]["auc"],
            "exact_auc": _exact_auc(study, sites, out / "results" / "classifier" / "image.npz"), "n": cam["n"],
            "peak_in_tumour": cam["peak_in_tumour"], "mass_in_tumour": cam["mass_in_tumour"],
            "chance": cam["chance"], "peak_ratio": cam["peak_in_tumour"] / cam["chance"],
            "mass_ratio": cam["mass_in_tumour"] / cam["chance"], "p": p,
            "image_rounds": study.classifier.image_rounds, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and prints) its figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-gradcam"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--image-rounds", type=int, default=0, help="federated rounds of the image model (0: the study's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("flwr", "ray", "numexpr", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rows = [_one_seed(args, seed) for seed in args.seeds]
    worst = {k: min(r[k] for r in rows) for k in ("auc", "exact_auc", "peak_ratio", "mass_ratio")}
    worst["p"] = max(r["p"] for r in rows)
    figures = {"seeds": rows, "worst": worst,
               "localises_on_every_seed": all(r["peak_ratio"] >= HIT_FACTOR and r["p"] < MAX_P
                                              and r["mass_ratio"] >= MASS_FACTOR for r in rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(figures, indent=1))
    print(f"{'seed':>4} {'inputs':>12} {'AUC':>6} {'exact':>6} {'n':>4} {'peak':>6} {'mass':>6} {'chance':>7} "  # noqa: T201
          f"{'peak/ch':>8} {'mass/ch':>8} {'p':>9}")
    for r in rows:
        print(f"{r['seed']:>4} {r['inputs']!s:>12} {r['auc']:>6.3f} {r['exact_auc']:>6.3f} {r['n']:>4} "  # noqa: T201
              f"{r['peak_in_tumour']:>6.3f} "
              f"{r['mass_in_tumour']:>6.3f} {r['chance']:>7.3f} {r['peak_ratio']:>8.2f} {r['mass_ratio']:>8.2f} "
              f"{r['p']:>9.2g}")
    print(json.dumps({"worst": worst, "localises_on_every_seed": figures["localises_on_every_seed"]}))  # noqa: T201
    return figures


if __name__ == "__main__":
    main()
