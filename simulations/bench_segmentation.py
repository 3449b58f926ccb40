"""Benchmark (not a test): federated vs centralised tumour segmentation on simulated 64^3 phantoms.

    python -m simulations.bench_segmentation                 # 3 sites, 64^3, the issue's targets
    python -m simulations.bench_segmentation --dp            # ... and a DP-SGD run at epsilon <= 8
    python -m simulations.bench_segmentation --tiny          # a smoke run (32^3, a few steps)
    python -m simulations.bench_segmentation --pipeline --seed 1   # the default study's chain on hidden hospitals
    python -m simulations.bench_segmentation --pipeline --seed 1 --networks monai nnunet   # ... both networks

``--pipeline``: the default study (``common/studies/default.yaml``: its segmentation settings and simulated sizes)
with its fingerprint and preprocessing phases, so the network trains and is scored on the preprocessed cases on
the plan's grid, over hospitals simulated with another seed than the demo's (``--seed``).

``--networks monai nnunet``: the same study federated once per network on the same sites (nnU-Net with its own
trainer and predictor, ``--nnunet-features``, ``--nnunet-steps`` local steps a round), each printed with its
exact per-site and pooled median DSC, wall time, and peak memory (resident, summed over the simulation's
processes, sampled from /proc), and which network reaches the better DSC within the first one's time.

Prints the federated pooled median DSC (exact, per case, on every site's held-out cases), the centralised
baseline's (same plan, same patches seen and sequential steps), their gap, and with ``--dp`` the DSC drop.
Targets: every site's median held-out DSC (exact, per case) >= 0.90 and |federated - centralised| <= 0.02.
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

log = logging.getLogger("bench_segmentation")


def _network_settings(args: argparse.Namespace, network: str | None) -> dict:
    """The segmentation overrides of one network of ``--networks`` (none: the study's own network)."""
    if network == "nnunet":
        seg: dict = {"network": "nnunet", "nnunet_base_features": args.nnunet_features[0],
                     "nnunet_max_features": args.nnunet_features[1]}
        if args.nnunet_steps:
            seg["steps_per_epoch"] = args.nnunet_steps
        return seg
    return {"network": network} if network else {}


def _pipeline_study(args: argparse.Namespace, dp: bool, network: str | None = None):  # noqa: ANN202 - StudyConfig
    import yaml

    from common.config import StudyConfig

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "common" / "studies" / "default.yaml").read_text())
    raw["phases"] = ["fingerprint", "preprocessing", "segmentation"]
    raw["name"] = f"bench-segmentation-pipeline{'-dp' if dp else ''}{'-' + network if network else ''}"
    raw["segmentation"] = {**raw.get("segmentation", {}), "overlays": 0, **_network_settings(args, network),
                           "dp": {"enabled": dp, "target_epsilon": args.epsilon, "max_grad_norm": args.clip}}
    return StudyConfig.model_validate(raw)


def _study(args: argparse.Namespace, dp: bool, network: str | None = None):  # noqa: ANN202 - StudyConfig
    from common.config import StudyConfig

    if args.pipeline:
        return _pipeline_study(args, dp, network)

    seg = {"rounds": args.rounds, "steps_per_epoch": args.steps, "patch_size": [args.patch] * 3,
           "batch_size": args.batch, "lr": args.lr, "holdout_fraction": args.holdout, "overlays": 0,
           "threads": args.threads, "evaluate_every": args.rounds, "strategy": args.strategy,
           "monai_channels": args.channels, "augment": args.augment,
           "foreground_ratio": args.foreground_ratio, **_network_settings(args, network),
           "dp": {"enabled": dp, "target_epsilon": args.epsilon, "max_grad_norm": args.clip}}
    return StudyConfig.model_validate({"name": f"bench-segmentation{'-dp' if dp else ''}{'-' + (network or '')}",
                                       "phases": ("fingerprint", "segmentation"), "min_sites": args.sites,
                                       "round_timeout_s": 3600, "segmentation": seg})


def _federated(args: argparse.Namespace, site_dirs: list[Path], out: Path, dp: bool,
               network: str | None = None) -> tuple[dict, dict, float]:
    import yaml

    from common.weights import load_weights
    from simulations.bench_scale import MemorySampler
    from simulations.engine import run_simulated_study

    study = _study(args, dp, network)
    tag = f"{'-dp' if dp else ''}{'-' + network if network else ''}"
    path = out / f"study{tag}.yaml"
    path.write_text(yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False))
    sampler = MemorySampler(interval=0.5)
    sampler.start()
    t0 = time.perf_counter()
    try:
        summary = run_simulated_study(study, path, site_dirs, out / f"federated{tag}",
                                      cpus_per_site=max(1.0, (os.cpu_count() or 1) / len(site_dirs)))
    finally:
        sampler.stop()
    seconds = time.perf_counter() - t0
    peak = max((s.driver_mb + s.workers_mb + s.ray_other_mb for s in sampler.samples), default=float("nan"))
    seg = summary["outputs"]["segmentation"]
    plan = json.loads(Path(seg["plan"]).read_text())
    return seg, {"plan": plan, "weights": load_weights(seg["final_model"]), "peak_mb": peak}, seconds


def _per_site(cmp_side: dict) -> dict[str, float]:
    import numpy as np

    return {s: float(np.median([v for k, v in cmp_side["dsc_per_case"].items() if k.startswith(f"{s}/")]))
            for s in cmp_side["sites"]}


def _compare_networks(args: argparse.Namespace, site_dirs: list[Path]) -> dict:
    """Each network of ``--networks`` federated on the same sites: exact DSC, time, peak memory."""
    from simulations.segmentation_baseline import pooled_volumes, score

    rows = {}
    for network in args.networks:
        seg, fed, seconds = _federated(args, site_dirs, args.out, dp=False, network=network)
        study = _study(args, False, network)
        _, held = pooled_volumes(site_dirs, study, fed["plan"]["sequences"])
        t0 = time.perf_counter()
        res = score(fed["plan"], fed["weights"], held, study)
        rows[network] = {"federated_dsc_median": res["pooled"]["dsc"]["median"],
                         "federated_dsc_median_per_site": _per_site(res), "federated_seconds": seconds,
                         "scoring_seconds": time.perf_counter() - t0, "peak_memory_mb": fed["peak_mb"],
                         "rounds": study.segmentation.rounds, "local_steps": study.segmentation.local_steps,
                         "patch": fed["plan"]["patch_size"], "batch": fed["plan"]["batch_size"],
                         "trainer": "nnUNetTrainer" if network == "nnunet" else "fedbiopsy loop",
                         "features": list(args.nnunet_features) if network == "nnunet" else None}
        log.info("network %s: DSC %.4f in %.0f s, peak %.0f MB", network, rows[network]["federated_dsc_median"],
                 seconds, fed["peak_mb"])
    first = rows[args.networks[0]]
    within = {n: r for n, r in rows.items() if r["federated_seconds"] <= 1.1 * first["federated_seconds"]}
    best = max(within, key=lambda n: within[n]["federated_dsc_median"])
    return {"networks": rows, "time_ratio_to_first": {n: r["federated_seconds"] / first["federated_seconds"]
                                                       for n, r in rows.items()},
            "peak_memory_ratio_to_first": {n: r["peak_memory_mb"] / first["peak_memory_mb"] for n, r in rows.items()},
            "better_within_first_time_budget": best}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and prints) its figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-segmentation"))
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=150, help="local steps per round")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--holdout", type=float, default=0.3)
    p.add_argument("--foreground-ratio", type=float, default=0.8, help="share of patches centred on tumour")
    p.add_argument("--augment", action="store_true", help="flips, rotations, intensity augmentation (off: the "
                   "phantoms need none, and it costs DSC per step on this short CPU budget)")
    p.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox", "fedmedian", "trimmed"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dp", action="store_true", help="also run with DP-SGD and report the DSC drop")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--tiny", action="store_true", help="smoke settings: 32^3, 8 patients, 2 rounds of 5 steps")
    p.add_argument("--pipeline", action="store_true", help="the default study's settings and sizes, preprocessed")
    p.add_argument("--seed", type=int, default=0, help="of the simulated hospitals (the demo's: 0)")
    p.add_argument("--networks", nargs="+", choices=["monai", "nnunet"], default=None,
                   help="federate once per network on the same sites and compare DSC, time and peak memory")
    p.add_argument("--nnunet-features", type=int, nargs=2, default=[8, 64], metavar=("BASE", "MAX"),
                   help="nnU-Net's features at the first stage and at most (nnU-Net's own: 32 320)")
    p.add_argument("--nnunet-steps", type=int, default=0, help="nnU-Net's local steps a round (0: the study's)")
    args = p.parse_args(argv)
    if args.pipeline:
        sim = _pipeline_study(args, False).simulation
        args.sites, args.patients, args.size = sim.sites, sim.patients, sim.size
    if args.tiny:
        args.size, args.patients, args.rounds, args.steps, args.sites = 32, 8, 2, 5, min(args.sites, 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("flwr", "ray", "numexpr", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    from common.sitedata import load_site_config, write_site_config
    from simulations.phantoms import simulate_sites
    from simulations.segmentation_baseline import compare_with_centralised, pooled_volumes, score

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    unlabelled = _pipeline_study(args, False).simulation.unlabelled if args.pipeline else 0
    site_dirs = simulate_sites(args.out / "sites", sites=args.sites, patients=args.patients, size=args.size,
                               seed=args.seed, unlabelled=unlabelled)
    if args.tiny:
        for d in site_dirs:
            cfg = load_site_config(d)
            write_site_config(cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"min_cohort": 2})}), d)
    if args.networks:
        figures = {"mode": "networks", "seed": args.seed, "sites": args.sites, "patients_per_site": args.patients,
                   "size": args.size, **_compare_networks(args, site_dirs),
                   "total_seconds": time.perf_counter() - t_start}
        (args.out / "bench-networks.json").write_text(json.dumps(figures, indent=1, default=str))
        print(json.dumps(figures, indent=1, default=str))  # noqa: T201 - a benchmark prints its figures
        return figures
    seg, fed, fed_seconds = _federated(args, site_dirs, args.out, dp=False)
    study = _study(args, dp=False)
    t0 = time.perf_counter()
    cmp = compare_with_centralised(fed["plan"], fed["weights"], study, site_dirs, args.out, overlays_per_site=1)
    cen_seconds = time.perf_counter() - t0
    fed_dsc = cmp["federated"]["pooled"]["dsc"]["median"]
    cen_dsc = cmp["centralised"]["pooled"]["dsc"]["median"]
    gap = cmp["dsc_gap_federated_minus_centralised"]
    per_site = _per_site(cmp["federated"])
    figures = {
        "mode": "pipeline (default study, preprocessed)" if args.pipeline else "segmentation only (raw)",
        "seed": args.seed, "inputs": seg.get("inputs"), "grid_spacing": seg.get("grid_spacing"),
        "federated_dsc_median_per_site": per_site,
        "sites": args.sites, "patients_per_site": args.patients, "size": args.size, "rounds": study.segmentation.rounds,
        "local_steps": study.segmentation.local_steps, "patch": fed["plan"]["patch_size"],
        "batch": fed["plan"]["batch_size"], "network": fed["plan"]["network"],
        "augment": study.segmentation.augment, "foreground_ratio": study.segmentation.foreground_ratio,
        "n_train": cmp["n_train"], "n_heldout": cmp["n_heldout"],
        "federated_dsc_median": fed_dsc,
        "federated_dsc_iqr": cmp["federated"]["pooled"]["dsc"]["q75"] - cmp["federated"]["pooled"]["dsc"]["q25"],
        "federated_hd95_median": cmp["federated"]["pooled"]["hd95"]["median"],
        "federation_reported_dsc_median": seg["final_dsc_median"], "centralised_dsc_median": cen_dsc,
        "gap_federated_minus_centralised": gap, "federated_seconds": fed_seconds,
        "centralised_seconds_incl_scoring": cen_seconds, "peak_memory_mb": fed["peak_mb"],
    }
    if args.dp:
        seg_dp, fed_dp, dp_seconds = _federated(args, site_dirs, args.out, dp=True)
        _, held = pooled_volumes(site_dirs, study, fed_dp["plan"]["sequences"])
        dp_score = score(fed_dp["plan"], fed_dp["weights"], held, study)
        figures.update({"dp_target_epsilon": args.epsilon, "dp_epsilon_spent": seg_dp["epsilon"],
                        "dp_dsc_median": dp_score["pooled"]["dsc"]["median"],
                        "dp_dsc_drop": fed_dsc - dp_score["pooled"]["dsc"]["median"], "dp_seconds": dp_seconds})
    figures["total_seconds"] = time.perf_counter() - t_start
    figures["targets_met"] = bool(min(per_site.values()) >= 0.90 and abs(gap) <= 0.02)
    (args.out / "bench.json").write_text(json.dumps({"figures": figures, "comparison": cmp}, indent=1, default=str))
    print(json.dumps(figures, indent=1, default=str))  # noqa: T201 - a benchmark prints its figures
    return figures


if __name__ == "__main__":
    main()
