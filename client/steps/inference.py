"""Site step of the inference phase: the federated model segments the site's cases without masks.

The round is :func:`common.segmentation.inference.run_inference`'s: the server sends the final segmentation
weights and plan; the site predicts a tumour mask for every valid case that has none (sliding-window
inference, largest connected component) on the study's imaging inputs (:mod:`client.steps.inputs`: the
preprocessed cases on the plan's grid, or the raw ones). The mask on that grid is what the features and
classifier phases read (:meth:`client.steps.inputs.ImagingInputs.predicted_dir`); the probability map is also
resampled (linear, then thresholded at 0.5) onto the raw reference sequence's grid and written to
``derived/predicted_masks/<patient_id>.nii.gz`` for the site's own use. Only the count of segmented cases goes
back (each count 0 or at least the policy's ``cell_floor``, else ``"<k"``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from client.segmentation.inference import keep_largest
from client.steps.base import SiteStep
from client.steps.inputs import PREDICTED_DIR, ImagingInputs, check_plan_grid, load_imaging_inputs, raw_inputs
from common.config import StudyConfig
from common.imageio import read_image, write_image
from common.protocol import Payload, unpack_weights
from common.replies import small_counts
from common.segmentation.inference import SEGMENT
from common.segmentation.protocol import PLAN_KEY
from common.sitedata import Case, Site

log = logging.getLogger(__name__)
MIN_TUMOUR_VOXELS = 10  # a smaller prediction is taken as "no tumour found"


def predicted_mask_path(site: Site, patient_id: str) -> Path:
    """Where the federated model's mask of an unlabelled case is kept at the site, on its native grid."""
    return site.root / "derived" / PREDICTED_DIR / f"{patient_id}.nii.gz"


def with_predicted_masks(site: Site) -> list[Case]:
    """The site's raw cases, those without a mask given the federated model's native-grid mask where it made one."""
    return raw_inputs(site).with_predicted_masks()


def native_probability(probability: np.ndarray, analysis: sitk.Image, native: sitk.Image,
                       fill_holes: bool = True) -> np.ndarray:
    """The tumour probability on the native grid: the map on ``analysis``'s grid, kept around its largest
    component above 0.5 (as the mask is), resampled linearly onto ``native``'s."""
    prob = sitk.GetImageFromArray(keep_largest(probability, fill_holes)[1])
    prob.CopyInformation(analysis)
    back = sitk.Resample(prob, native, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(back)


def native_mask(probability: np.ndarray, analysis: sitk.Image, native: sitk.Image,
                fill_holes: bool = True) -> np.ndarray:
    """The tumour mask on the native grid: :func:`native_probability` thresholded at 0.5 (label-aware: no
    staircase of a nearest-neighbour mask; a thin part of the one component may come back as its own island)."""
    return (native_probability(probability, analysis, native, fill_holes) > 0.5).astype(np.uint8)


def _write_mask(mask: np.ndarray, geometry: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(geometry)
    write_image(image, path)


def segment_cases(inputs: ImagingInputs, study: StudyConfig, plan: dict, weights: dict) -> tuple[int, int]:
    """Segment every input case without a mask; (segmented, empty)."""
    from client.segmentation.data import load_volume
    from client.segmentation.inference import predict_probability
    from client.training.device import pick_device, set_threads
    from common.segmentation.networks import build_network, set_weights

    site = inputs.site
    set_threads(study.segmentation.threads)
    net = build_network(plan)
    set_weights(net, weights, site.site_id)
    device = pick_device()
    raw = {c.patient_id: c for c in inputs.raw.cases}
    segmented = empty = 0
    for case in site.cases:
        if case.mask is not None:
            continue
        for old in (inputs.predicted_dir / f"{case.patient_id}.nii.gz",
                    predicted_mask_path(inputs.raw, case.patient_id)):
            old.unlink(missing_ok=True)  # an earlier model's mask never stands in for this one's
        volume = load_volume(case, plan["sequences"])
        prob = predict_probability(net, volume.image, plan["patch_size"], device, overlap=study.segmentation.sw_overlap,
                                   mirror=study.segmentation.mirror, plan=plan, spacing=volume.spacing)
        mask, _ = keep_largest(prob, study.segmentation.fill_holes)
        if mask.sum() < MIN_TUMOUR_VOXELS:  # no tumour found: the case keeps no mask (no features, no classifier)
            empty += 1
            log.warning("site %s: the model found no tumour in %s", site.site_id, case.patient_id)
            continue
        reference = read_image(case.images[study.reference_sequence])
        _write_mask(mask, reference, inputs.predicted_dir / f"{case.patient_id}.nii.gz")
        if inputs.plan_sha256 is not None:  # and back onto the site's own grid
            native = read_image(raw[case.patient_id].images[study.reference_sequence])
            _write_mask(native_mask(prob, reference, native, study.segmentation.fill_holes), native,
                        predicted_mask_path(inputs.raw, case.patient_id))
        segmented += 1
    log.info("site %s: segmented %d case(s) without masks into %s (%d empty; inputs %s)", site.site_id, segmented,
             inputs.predicted_dir, empty, inputs.kind)
    return segmented, empty


def segment_unlabelled_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Segment the cases without masks with the server's model; reply with counts only."""
    plan = json.loads(str(payload[PLAN_KEY]))
    inputs = load_imaging_inputs(site, study)
    check_plan_grid(inputs, plan.get("target_spacing"))
    segmented, empty = segment_cases(inputs, study, plan, unpack_weights(payload))
    # counts about named cases, adding up to the unlabelled cases: exact only when each is 0 or >= cell_floor
    return small_counts(site.config.policy.cell_floor, n_segmented=segmented, n_empty=empty)


STEPS: dict[str, SiteStep] = {SEGMENT: SiteStep("segmentation", segment_unlabelled_step)}
