"""Site step of the features phase: radiomics of every valid case, kept at the site; only counts and the
settings hash go back.

The table is ``work_dir(site)/features.csv`` (index ``patient_id``) with ``features.json`` beside it (resolved
settings, their sha256, the failed cases and why, and ``inputs``: which images it was computed on), read by
the later federated phases (harmonisation, reduction, classifier, outcomes) at the same site.

The images are the study's imaging inputs (:mod:`client.steps.inputs`): with the preprocessing phase the
preprocessed cases on the plan's grid (their masks resampled with them, or the federated model's mask on that
grid for a case without one), else the raw cases.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from client.features.table import FeatureTable, extract_cases
from client.steps.base import SiteStep, work_dir
from client.steps.inference import with_predicted_masks
from client.steps.inputs import load_imaging_inputs
from common.config import StudyConfig
from common.errors import PolicyError, ProtocolError
from common.features.protocol import FEATURES, SETTINGS_KEY, SPACING_KEY
from common.features.settings import RadiomicsSettings, load_radiomics_settings, parse_radiomics_settings
from common.imageio import read_image
from common.maps.habitats import habitat_fractions, habitat_names
from common.protocol import Payload
from common.replies import small_count
from common.sitedata import Case, Site

log = logging.getLogger(__name__)

FEATURES_FILE = "features.csv"


def features_path(site: Site) -> Path:
    """Where a site's feature table is (``derived/features.csv``)."""
    return work_dir(site) / FEATURES_FILE


def _settings(site: Site, study: StudyConfig, payload: Payload) -> RadiomicsSettings:
    if SETTINGS_KEY in payload:
        return parse_radiomics_settings(json.loads(str(payload[SETTINGS_KEY])), f"{SETTINGS_KEY} from the server")
    return load_radiomics_settings(study.features.settings)


def _spacing(site: Site, payload: Payload) -> tuple[float, float, float] | None:
    if SPACING_KEY not in payload:
        return None
    value = np.asarray(payload[SPACING_KEY], dtype=np.float64).ravel()
    if value.shape != (3,) or not np.all(np.isfinite(value)) or np.any(value <= 0):
        raise ProtocolError(site.site_id, f"{SPACING_KEY} is {value.tolist()}, not 3 positive spacings in mm",
                            "run the fingerprint phase before the features phase")
    return (float(value[0]), float(value[1]), float(value[2]))


def write_site_features(site: Site, study: StudyConfig, spacing: Sequence[float] | None = None,
                        settings: RadiomicsSettings | None = None, workers: int | None = None,
                        progress: bool = False) -> tuple[Path, FeatureTable]:
    """Extract the site's radiomics table (study sequences, on the study's imaging inputs) and write it to
    :func:`features_path`."""
    settings = settings or load_radiomics_settings(study.features.settings)
    inputs = load_imaging_inputs(site, study)
    cases = inputs.with_predicted_masks()
    table = extract_cases(cases, study.channels, settings, spacing,
                          workers=workers or study.features.workers, progress=progress)
    habitats = study.maps.habitats if study.four_d else None
    if habitats is not None and not set(habitats) <= set(study.channels):
        log.info("site %s: habitats of %s skipped (not both among the study's channels)", site.site_id, habitats)
        habitats = None
    if habitats is not None:
        add_habitat_columns(table, cases, habitats, study.maps.habitat_thresholds)
    path = table.write(features_path(site), inputs={
        "inputs": inputs.kind, "grid_spacing": inputs.grid_spacing, "plan_sha256": inputs.plan_sha256,
        "habitats": None if habitats is None else {"maps": list(habitats),
                                                   "thresholds": list(study.maps.habitat_thresholds)}})
    log.info("site %s: %d case(s) x %d feature(s) -> %s (settings %s, %d failed, inputs %s)", site.site_id,
             len(table.frame), table.frame.shape[1], path, table.settings_hash[:12], len(table.failures),
             inputs.kind)
    return path, table


def add_habitat_columns(table: FeatureTable, cases: Sequence[Case], maps: tuple[str, str],
                        thresholds: tuple[float, float]) -> None:
    """Add each case's tumour habitat fractions (:mod:`common.maps.habitats`) to its row of ``table``."""
    by_id = {c.patient_id: c for c in cases}
    rows = {}
    for pid in table.frame.index:
        case = by_id[str(pid)]
        if case.mask is None:
            continue
        mask = sitk.GetArrayFromImage(read_image(case.mask)) > 0
        arrays = [sitk.GetArrayFromImage(read_image(case.images[m])).astype(np.float64) for m in maps]
        rows[pid] = habitat_fractions(arrays[0], arrays[1], mask, thresholds, maps)
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(table.frame.index)
    for col in habitat_names(*maps):
        table.frame[col] = frame[col].to_numpy()


def features_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Write the site's feature table; reply with counts and the settings hash (no patient-level value)."""
    _, table = write_site_features(site, study, _spacing(site, payload), _settings(site, study, payload))
    n = int(len(table.frame))
    min_cohort = site.config.policy.min_cohort
    if n < min_cohort:
        raise PolicyError(site.site_id, "min_cohort", f"features for {n} case(s), policy needs at least {min_cohort}")
    return {
        "n_cases": n,
        "n_features": int(table.frame.shape[1]),
        **small_count("n_failed", len(table.failures), site.config.policy.cell_floor),
        "settings_hash": table.settings_hash,
    }


def _cases_with_masks(site: Site) -> int:
    return len([c for c in with_predicted_masks(site) if c.mask is not None])


STEPS: dict[str, SiteStep] = {
    FEATURES: SiteStep("features", features_step, _cases_with_masks),
}
