"""Site step of the fingerprint phase: measure the site's cases, return aggregates only."""

from __future__ import annotations

import logging
import zlib

import numpy as np
import SimpleITK as sitk

from client.steps.base import SiteStep, cases_with_masks
from common.config import StudyConfig
from common.fingerprint import FINGERPRINT, CaseMeasure, case_manifest_hash, site_fingerprint
from common.hashing import sha256_file
from common.imageio import read_image
from common.protocol import Payload
from common.sitedata import Site

log = logging.getLogger(__name__)


def manifest_hash(site: Site) -> str:
    """The hash of the site's case manifest: valid case ids with the sha256 of their images, mask and clinical table."""
    files = {}
    for case in site.cases:
        entry = {seq: sha256_file(path) for seq, path in case.images.items()}
        if case.mask is not None:
            entry["mask"] = sha256_file(case.mask)
        files[case.patient_id] = entry
    clinical = site.root / "clinical.csv"
    return case_manifest_hash(files, {"clinical.csv": sha256_file(clinical)} if clinical.is_file() else None)


def fingerprint_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Measure the site's cases with masks and return the fingerprint aggregates, bounded by the site's policy
    (:func:`common.fingerprint.site_fingerprint` with its ``cell_floor``)."""
    cfg = study.fingerprint
    measures = []
    for case in site.cases:
        if case.mask is None:
            continue
        mask = sitk.GetArrayFromImage(read_image(case.mask)) > 0
        rng = np.random.default_rng([cfg.seed, zlib.crc32(case.patient_id.encode())])
        idx = np.flatnonzero(mask)
        take = rng.choice(idx, size=min(cfg.foreground_samples_per_case, idx.size), replace=False)
        fg = {seq: sitk.GetArrayFromImage(read_image(case.images[seq])).ravel()[take] for seq in study.channels}
        ref = read_image(case.images[study.reference_sequence])
        measures.append(CaseMeasure(tuple(ref.GetSpacing()), tuple(ref.GetSize()), fg))
    out = site_fingerprint(site.site_id, measures, study.channels, cfg.percentiles, site.config.policy.min_cohort,
                           site.config.policy.cell_floor)
    out["field_strength"] = site.config.require_scanner().field_strength
    out["vendor"] = site.config.require_scanner().vendor
    out["manifest_hash"] = manifest_hash(site)
    out["manifest_cases"] = len(site.cases)
    return out


STEPS: dict[str, SiteStep] = {
    FINGERPRINT: SiteStep("fingerprint", fingerprint_step, cases_with_masks),
}
