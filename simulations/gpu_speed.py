"""Training steps per second of the segmentation network on GPU vs CPU (falls back to CPU-only without CUDA).

    python -m simulations.gpu_speed                       # the default study's network (MONAI UNet)
    python -m simulations.gpu_speed --network nnunet      # nnU-Net planned for 64^3 phantoms
    python -m simulations.gpu_speed --dp                  # also time DP-SGD steps (Opacus)

A step is what a site does in its local round: sample a batch of augmented patches from phantom volumes, one
forward/backward/optimizer step (mixed precision on CUDA). Prints one JSON object with steps/s per device and
the GPU/CPU ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

log = logging.getLogger("gpu_speed")


def _aggregate(size: int, n: int) -> dict:
    intensity = {s: {"mean": 500.0, "std": 150.0, "min": 0.0, "max": 1200.0,
                     "percentiles": {"p0.5": 20.0, "p50": 500.0, "p99.5": 1100.0}} for s in ("T2w", "CET1")}
    return {"n_cases": n, "spacing_median": [1.1, 1.1, 1.25], "shape_median": [size] * 3, "intensity": intensity}


def time_steps(plan: dict, study: Any, volumes: list, device: Any, steps: int, dp: bool) -> float:
    """Steps per second of ``steps`` local steps on ``device`` after a 2-step warm-up."""
    import torch

    from client.segmentation.data import PatchSampler
    from client.segmentation.local import StepSettings, run_local_steps
    from client.training.dp import DPPlan
    from common.segmentation.networks import build_network

    cfg = study.segmentation
    net = build_network(plan, seed=0)
    sampler = PatchSampler(volumes, plan["patch_size"], cfg.foreground_ratio, cfg.augment, seed=0)

    def settings(n: int) -> StepSettings:
        return StepSettings(steps=n, batch_size=int(plan["batch_size"]), num_classes=2, optimizer=cfg.optimizer,
                            lr=cfg.lr, weight_decay=0.0, amp=cfg.amp)

    def dp_plan() -> DPPlan | None:
        return DPPlan(1.0, 0.1, 1.0, "rdp", 1e-5, []) if dp else None

    run_local_steps(net, sampler, settings(2), device, dp=dp_plan())
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_local_steps(net, sampler, settings(steps), device, dp=dp_plan())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    """Measure and print steps/s on CPU and, when present, CUDA."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", choices=["monai", "nnunet"], default="monai")
    p.add_argument("--size", type=int, default=64, help="phantom volume edge")
    p.add_argument("--patch", type=int, default=None, help="patch edge (default: 32 for monai, the plan's for nnunet)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 2 / the plan's)")
    p.add_argument("--cpu-steps", type=int, default=10)
    p.add_argument("--gpu-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--dp", action="store_true", help="also time DP-SGD steps")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    import torch

    from client.segmentation.data import Volume, zscore
    from common.config import StudyConfig
    from common.segmentation.networks import build_network, count_parameters
    from common.segmentation.plan import make_plan
    from simulations.phantoms import simulate_patient

    if args.threads:
        torch.set_num_threads(args.threads)
    seg: dict = {"network": args.network}
    if args.network == "monai":
        seg.update(patch_size=[args.patch or 32] * 3, batch_size=args.batch or 2)
    else:
        seg.update(patch_size=[args.patch] * 3 if args.patch else None, batch_size=args.batch)
    study = StudyConfig.model_validate({"segmentation": seg})
    plan = make_plan(_aggregate(args.size, 36), study)
    volumes = []
    for i in range(4):
        ph = simulate_patient(0, i, size=args.size)
        image = np.stack([zscore(ph.images[s]) for s in ("T2w", "CET1")])
        volumes.append(Volume(f"p{i}", image, ph.mask[None].astype(np.uint8), (1.0, 1.0, 1.0)))

    out: dict = {"network": plan["network"], "parameters": count_parameters(build_network(plan)),
                 "patch_size": plan["patch_size"], "batch_size": plan["batch_size"],
                 "cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    out["cpu_steps_per_s"] = time_steps(plan, study, volumes, torch.device("cpu"), args.cpu_steps, dp=False)
    if args.dp:
        out["cpu_dp_steps_per_s"] = time_steps(plan, study, volumes, torch.device("cpu"), args.cpu_steps, dp=True)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_amp"] = study.segmentation.amp
        out["gpu_steps_per_s"] = time_steps(plan, study, volumes, dev, args.gpu_steps, dp=False)
        out["gpu_over_cpu"] = out["gpu_steps_per_s"] / out["cpu_steps_per_s"]
        if args.dp:
            out["gpu_dp_steps_per_s"] = time_steps(plan, study, volumes, dev, args.gpu_steps, dp=True)
    else:
        out["note"] = "no CUDA device: GPU speed not measured"
    print(json.dumps(out, indent=1))  # noqa: T201 - a benchmark prints its figures
    return out


if __name__ == "__main__":
    main()
