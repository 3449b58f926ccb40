"""Site step of the inference phase: the federated model segments the site's cases without masks.

The round is :func:`common.segmentation.inference.run_inference`'s: the server sends the final segmentation
weights and plan; the site predicts a tumour mask for every valid case that has none (sliding-window
inference, largest connected component) and writes it to ``derived/predicted_masks/<patient_id>.nii.gz`` on
the reference sequence's grid. The features phase then uses these masks for those cases. Only the count of
segmented cases goes back (each count 0 or at least the policy's ``cell_floor``, else ``"<k"``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from client.steps.base import SiteStep, work_dir
from common.config import StudyConfig
from common.imageio import read_image, write_image
from common.protocol import Payload, unpack_weights
from common.replies import small_counts
from common.segmentation.inference import SEGMENT
from common.segmentation.protocol import PLAN_KEY
from common.sitedata import Case, Site

log = logging.getLogger(__name__)
PREDICTED_DIR = "predicted_masks"
MIN_TUMOUR_VOXELS = 10  # a smaller prediction is taken as "no tumour found"


def predicted_mask_path(site: Site, patient_id: str) -> Path:
    """Where the federated model's mask of an unlabelled case is kept at the site."""
    return site.root / "derived" / PREDICTED_DIR / f"{patient_id}.nii.gz"


def with_predicted_masks(site: Site) -> list[Case]:
    """The site's cases, those without a mask given the federated model's mask where this phase made one.

    For the features and the image classifier; segmentation training keeps to the radiologists' masks.
    """
    cases = []
    for case in site.cases:
        predicted = predicted_mask_path(site, case.patient_id)
        cases.append(replace(case, mask=predicted) if case.mask is None and predicted.is_file() else case)
    return cases


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a binary mask (an empty mask stays empty)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(np.uint8)
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == int(np.argmax(sizes)) + 1).astype(np.uint8)


def segment_unlabelled_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Segment the cases without masks with the server's model; reply with counts only."""
    from client.segmentation.data import load_volume
    from client.segmentation.inference import predict_probability
    from client.training.device import pick_device, set_threads
    from common.segmentation.networks import build_network, set_weights

    plan = json.loads(str(payload[PLAN_KEY]))
    weights = unpack_weights(payload)
    set_threads(study.segmentation.threads)
    net = build_network(plan)
    set_weights(net, weights, site.site_id)
    device = pick_device()
    out_dir = work_dir(site) / PREDICTED_DIR
    segmented = empty = 0
    for case in site.cases:
        if case.mask is not None:
            continue
        volume = load_volume(case, plan["sequences"])
        prob = predict_probability(net, volume.image, plan["patch_size"], device, overlap=study.segmentation.sw_overlap)
        mask = largest_component(prob > 0.5)
        if mask.sum() < MIN_TUMOUR_VOXELS:  # no tumour found: the case keeps no mask (no features, no classifier)
            empty += 1
            log.warning("site %s: the model found no tumour in %s", site.site_id, case.patient_id)
            continue
        reference = read_image(case.images[study.reference_sequence])
        image = sitk.GetImageFromArray(mask)
        image.CopyInformation(reference)
        write_image(image, out_dir / f"{case.patient_id}.nii.gz")
        segmented += 1
    log.info("site %s: segmented %d case(s) without masks into %s (%d empty)", site.site_id, segmented, out_dir,
             empty)
    # counts about named cases, adding up to the unlabelled cases: exact only when each is 0 or >= cell_floor
    return small_counts(site.config.policy.cell_floor, n_segmented=segmented, n_empty=empty)


STEPS: dict[str, SiteStep] = {SEGMENT: SiteStep("segmentation", segment_unlabelled_step)}
