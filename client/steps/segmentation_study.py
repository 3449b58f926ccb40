"""Site step of the segmentation study (:mod:`common.segmentation.study`): rater vs rater, model vs rater.

Everything is compared on the site's native grid, where its radiologists drew: rater 1 is ``masks/``, further
raters ``raters/<pid>/<rater>.nii.gz`` (:func:`common.sitedata.rater_masks`). The model segments the study's
imaging inputs (the preprocessed cases on the plan's grid, or the raw ones) exactly as the inference phase
does (largest component), and its probability map goes back onto the native grid
(:func:`client.steps.inference.native_probability`). Only held-out cases (:func:`client.segmentation.data.split_cases`)
enter the automatic table: the model never trained on them; that set is held to the site's release ledger
(scope ``segmentation-study-split``), so a server cannot difference two studies' tables into one case's values,
and a study asks it once (the same request again is a rerun). The inter-observer table is over every rated case
and every pair, whatever the server asks; the set of rated cases is held to the ledger too (scope
``segmentation-raters``: a rater added for one more case would otherwise difference into that case), else that
table is withheld. Mask comparison
images (rater, model and their difference: false positives red, false negatives blue, in three planes) are
written for the first ``segmentation.overlays`` of them under ``derived/segmentation/comparison-<study>/``; they
stay at the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from itertools import combinations
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from client.steps.base import SiteStep, release_ledger, work_dir
from client.steps.inference import native_probability
from client.steps.inputs import check_plan_grid, load_imaging_inputs
from common.config import StudyConfig
from common.errors import PolicyError, SiteDataError
from common.imageio import geometry_mismatches, read_image
from common.protocol import Payload, unpack_weights
from common.release_ledger import SEGMENTATION_RATERS, SEGMENTATION_STUDY_SPLIT
from common.segmentation.metrics import case_metrics, site_summary
from common.segmentation.protocol import PLAN_KEY
from common.segmentation.study import SECONDS_KEY, SEGMENTATION_STUDY, TIMED_KEY, table_reply
from common.sitedata import Case, Site, rater_masks

log = logging.getLogger(__name__)


def _masks(site: Site, case: Case, reference: sitk.Image) -> dict[str, np.ndarray]:
    """Every rater's mask of a case on the reference image's grid (rater 1 first)."""
    paths = {"rater1": case.mask, **rater_masks(site.root, case.patient_id)}
    out = {}
    for name, path in paths.items():
        image = read_image(path)  # type: ignore[arg-type]
        if geometry_mismatches(image, reference):
            raise SiteDataError(str(path), "the rater's mask is not on the grid of the case's reference image",
                                "export every rater's mask on the reference sequence's grid")
        out[name] = sitk.GetArrayFromImage(image) > 0
    return out


def mean_metrics(pairs: list[dict[str, float]]) -> dict[str, float]:
    """A case's value per metric: the mean over its pairs (NaN where every pair is undefined)."""
    out = {}
    for metric in pairs[0]:
        values = [p[metric] for p in pairs if np.isfinite(p[metric])]
        out[metric] = float(np.mean(values)) if values else float("nan")
    return out


def save_comparison(image: np.ndarray, rater: np.ndarray, model: np.ndarray, path: Path, title: str) -> Path:
    """Rater, model and their difference (false positives red, false negatives blue) in three planes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    both = np.argwhere(rater | model)
    centre = [int(round(x)) for x in both.mean(axis=0)] if both.size else [n // 2 for n in rater.shape]
    fig, axes = plt.subplots(3, 3, figsize=(8, 8))
    diff = np.zeros(rater.shape, dtype=np.uint8)
    diff[model & ~rater] = 1  # false positive
    diff[rater & ~model] = 2  # false negative
    diff_cmap = ListedColormap([(0, 0, 0, 0), (0.9, 0.1, 0.1, 0.9), (0.1, 0.3, 0.95, 0.9)])
    for col, (axis, plane) in enumerate(zip(range(3), ("axial", "coronal", "sagittal"), strict=True)):
        cut: list[slice | int] = [slice(None)] * 3
        cut[axis] = centre[axis]
        sl = tuple(cut)
        for row, (label, mask) in enumerate((("rater", rater), ("model", model), ("difference", None))):
            ax = axes[row, col]
            ax.imshow(image[sl], cmap="gray")
            if mask is not None and mask[sl].any():
                ax.contour(mask[sl].astype(float), levels=[0.5], colors="lime" if row == 0 else "orange",
                           linewidths=1.0)
            if mask is None:
                ax.imshow(diff[sl], cmap=diff_cmap, vmin=0, vmax=2, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"{label}, {plane}", fontsize=8)
    fig.suptitle(f"{title}\n(difference: red false positive, blue false negative)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def study_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """The site's inter-observer and automatic tables (aggregates over its cases) and the model's seconds."""
    from client.segmentation.data import load_volume, split_cases
    from client.segmentation.inference import predict_probability
    from client.segmentation.task import hold_to_ledger
    from client.training.device import pick_device, set_threads
    from common.segmentation.networks import build_network, set_weights

    cfg = study.segmentation
    policy = site.config.policy
    plan = json.loads(str(payload[PLAN_KEY]))
    inputs = load_imaging_inputs(site, study)
    check_plan_grid(inputs, plan.get("target_spacing"))
    weights = unpack_weights(payload)
    rated = rated_cases(site)
    _, held = split_cases(inputs.site.cases, cfg.holdout_fraction, cfg.seed)  # cases on the grid only
    held_ids = {c.patient_id for c in held}
    on_grid = {c.patient_id: c for c in inputs.site.cases}
    held_rated = [c.patient_id for c in rated if c.patient_id in held_ids]
    ledger = release_ledger(site)
    if ledger is not None:
        asked = hashlib.sha256(json.dumps(plan, sort_keys=True).encode() + b"".join(
            np.ascontiguousarray(v).tobytes() for _, v in sorted(weights.items()))).hexdigest()
        if ledger.closed(SEGMENTATION_STUDY_SPLIT) or not ledger.once(SEGMENTATION_STUDY_SPLIT, study.hash,
                                                                      "segmentation_study", asked):
            raise PolicyError(site.site_id, "release_ledger", "one segmentation study round a study (another "
                              "model scored on the same cases would be a new question about them)")
    release_inter = len(rated) >= policy.min_cohort and (
        ledger is None or ledger.try_release(SEGMENTATION_RATERS, [c.patient_id for c in rated],
                                             [[c.patient_id for c in rated]], study.hash, count=False))
    if len(held_rated) >= policy.min_cohort:  # else the automatic table is withheld: nothing to hold or compute
        hold_to_ledger(site, study, SEGMENTATION_STUDY_SPLIT, held_rated, held_rated)
    else:
        held_rated = []
    inter, auto = [], []
    for case in rated if release_inter else []:
        reference = read_image(case.images[study.reference_sequence])
        masks = _masks(site, case, reference)
        spacing = tuple(float(s) for s in reversed(reference.GetSpacing()))
        inter.append(mean_metrics([case_metrics(masks[a], masks[b], None, spacing)
                                   for a, b in combinations(sorted(masks), 2)]))
    seconds = 0.0
    out_dir = work_dir(site) / "segmentation" / f"comparison-{study.hash[:12]}"
    if held_rated:
        set_threads(cfg.threads)
        net = build_network(plan)
        set_weights(net, weights, site.site_id)
        device = pick_device()
    for case in (c for c in rated if c.patient_id in held_rated):
        t0 = time.perf_counter()
        grid_case = on_grid[case.patient_id]
        volume = load_volume(grid_case, plan["sequences"])
        prob = predict_probability(net, volume.image, plan["patch_size"], device, overlap=cfg.sw_overlap,
                                   mirror=cfg.mirror, plan=plan, spacing=volume.spacing)
        reference = read_image(case.images[study.reference_sequence])
        analysis = read_image(grid_case.images[study.reference_sequence])  # the raw reference on raw inputs
        score = native_probability(prob, analysis, reference, cfg.fill_holes)
        model = score > 0.5
        seconds += time.perf_counter() - t0
        masks = _masks(site, case, reference)
        spacing = tuple(float(s) for s in reversed(reference.GetSpacing()))
        scored = [case_metrics(m, model, score, spacing) for m in masks.values()]
        auto.append(mean_metrics(scored))
        if len(auto) <= cfg.overlays:
            save_comparison(sitk.GetArrayFromImage(reference), masks["rater1"], model,
                            out_dir / f"{case.patient_id}.png",
                            f"{case.patient_id}: model vs rater 1, DSC {scored[0]['dsc']:.3f}")

    reply: Payload = {}
    for name, rows in (("inter", inter), ("auto", auto)):
        flat: Mapping[str, float] | None = None
        if len(rows) >= policy.min_cohort:
            flat = site_summary(site.site_id, rows, policy.min_cohort, policy.cell_floor)
        else:
            log.info("site %s: the %s table has %d case(s), under min_cohort %d: withheld", site.site_id, name,
                     len(rows), policy.min_cohort)
        reply.update(table_reply(name, flat))
    if len(auto) >= policy.min_cohort:  # the model's time goes with the table it was measured for
        reply[SECONDS_KEY] = seconds
        reply[TIMED_KEY] = float(len(auto))
    log.info("site %s: segmentation study over %d rated case(s), %d held out; comparisons in %s", site.site_id,
             len(inter), len(auto), out_dir)
    return reply


def rated_cases(site: Site) -> list[Case]:
    """The site's cases with a radiologist's mask and further raters' masks."""
    return [c for c in site.cases if c.mask is not None and rater_masks(site.root, c.patient_id)]


STEPS: dict[str, SiteStep] = {SEGMENTATION_STUDY: SiteStep("segmentation", study_step,
                                                           lambda site: len(rated_cases(site)))}
