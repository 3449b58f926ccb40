"""Site steps of the preprocessing phase: Nyúl landmarks (aggregates only) and receiving the global plan.

``nyul_landmarks``: every valid case runs the study's preprocessing up to normalisation (with the target
spacing the server sends), its foreground landmarks are measured, and only their mean over the site's cases
(:func:`common.nyul.site_nyul`, at least ``min_cohort`` cases) is returned.
``preprocessing_plan``: the server's plan is checked and stored as ``derived/plan.json``; the site answers
with its sha256 only.
``preprocessing_apply``: the site preprocesses its cohort with the plan into ``derived/preprocessed/`` and
answers per-sequence foreground histograms summed over its cases, before and after.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from client.preprocessing.cohort import preprocess_site, stage_key, write_stage
from client.preprocessing.foreground import foreground_mask, values_in
from client.preprocessing.normalise import nyul_case_landmarks
from client.preprocessing.pipeline import build_pipeline, load_case
from client.steps.base import SiteStep, work_dir
from client.steps.inputs import PLAN_FILE, PREPROCESSED_DIR
from common.config import StudyConfig
from common.errors import ConfigError, PolicyError, ProtocolError, SiteDataError
from common.imageio import find_image, read_image
from common.nyul import site_nyul
from common.plan import parse_plan, write_plan
from common.preprocessing import APPLY, NYUL_LANDMARKS, PLAN
from common.protocol import Payload
from common.replies import small_count
from common.sitedata import Site

log = logging.getLogger(__name__)


def nyul_landmarks_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Mean Nyúl landmarks (mapped onto the standard range) over the site's cases, per sequence."""
    cfg = study.preprocessing
    spacing = payload.get("target_spacing")
    target = tuple(float(s) for s in np.asarray(spacing).ravel()) if spacing is not None else None
    pipeline = build_pipeline(cfg, target, None, include_normalise=False)
    landmarks = []
    stage = stage_dir(site)
    shutil.rmtree(stage, ignore_errors=True)
    for case in site.cases:
        volumes = pipeline(load_case(case, study.channels, study.reference_sequence))
        # kept for the apply round, which then only normalises it
        write_stage(volumes, stage, stage_key(case, study.channels, cfg, target, study.hash))
        landmarks.append(nyul_case_landmarks(volumes, cfg.normalise.nyul_percentiles))
    log.info("site %s: Nyúl landmarks over %d case(s) after %s", site.site_id, len(landmarks), pipeline.names)
    return site_nyul(site.site_id, landmarks, study.intensity_sequences, cfg.normalise.nyul_percentiles,
                     cfg.normalise.nyul_scale, site.config.policy.min_cohort)


def stage_dir(site: Site) -> Path:
    """The site's cases as the landmarks round left them (before normalisation), for the apply round."""
    return work_dir(site) / "preprocessing-stage"


def store_plan_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Check the server's plan against the study and keep it at the site; reply with its hash."""
    plan = parse_plan(str(payload.get("plan_json", "")), "plan from the server")
    if plan.study_hash != study.hash:
        raise ConfigError("plan from the server", "was built for another study config",
                          "the server must send the plan of the study it runs")
    sha = write_plan(plan, work_dir(site) / PLAN_FILE)
    log.info("site %s: stored the preprocessing plan %s", site.site_id, sha[:12])
    return {"plan_sha256": sha}



def _foreground_values(images: dict[str, Path], reference: str) -> dict[str, np.ndarray]:
    """Each sequence's voxel values in the reference sequence's foreground (as the normalisation uses)."""
    loaded = {seq: read_image(path) for seq, path in images.items()}
    fg = foreground_mask(loaded[reference], str(images[reference]))
    return {seq: values_in(img, fg) for seq, img in loaded.items()}


def histogram_edges(site_id: str, payload: Payload, sequences: list[str] | tuple[str, ...], max_bins: int
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The server's raw and preprocessed bin edges per sequence, checked: finite, strictly increasing, and at
    most the site's ``histogram_bins`` bins (else refused, rule ``histogram_bins``)."""
    edges = {}
    for seq in sequences:
        pair = []
        for kind in ("raw_edges", "std_edges"):
            key = f"{seq}/{kind}"
            if key not in payload:
                raise ProtocolError(site_id, f"the apply request has no {key}", "run the same fedbiopsy version")
            e = np.asarray(payload[key], dtype=np.float64).ravel()
            if e.size < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
                raise ProtocolError(site_id, f"{key} are not finite, strictly increasing bin edges")
            if e.size - 1 > max_bins:
                raise PolicyError(site_id, "histogram_bins", f"{key}: {e.size - 1} bins requested, the site's "
                                  f"policy releases at most {max_bins}")
            pair.append(e)
        edges[seq] = (pair[0], pair[1])
    return edges


def released_histogram(hist: np.ndarray, contributors: np.ndarray, cell_floor: int) -> np.ndarray:
    """The histogram a site sends: bins with voxels of fewer than ``cell_floor`` cases are emptied (a server
    choosing narrow edges around one case's intensities learns nothing of that case)."""
    if cell_floor <= 1:
        return hist
    return np.where(contributors >= cell_floor, hist, 0.0)


def apply_plan_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Preprocess the cohort with the stored plan into ``derived/preprocessed`` (a valid site directory).

    Replies, per sequence, the foreground intensity histograms summed over the site's cases before and after
    preprocessing, on the server's bin edges (at most the policy's ``histogram_bins``): aggregates over the
    cohort only (at least ``min_cohort`` cases, and each bin's voxels from at least ``cell_floor`` of them).
    """
    policy = site.config.policy
    edges = histogram_edges(site.site_id, payload, study.intensity_sequences, policy.histogram_bins)
    plan = parse_plan((work_dir(site) / PLAN_FILE).read_text(encoding="utf-8"), work_dir(site) / PLAN_FILE)
    out = work_dir(site) / PREPROCESSED_DIR
    report = preprocess_site(site.root, out, study, plan=plan, workers=1, stage_dir=stage_dir(site))
    shutil.rmtree(stage_dir(site), ignore_errors=True)  # no second copy of the images stays
    done = sorted(report.completed)
    if len(done) < policy.min_cohort:
        raise PolicyError(site.site_id, "min_cohort", f"only {len(done)} case(s) preprocessed, policy needs "
                          f"{policy.min_cohort}; see {out / 'preprocessing.json'}")
    reply: Payload = {"n_cases": len(done), **small_count("n_failed", len(report.failed), policy.cell_floor)}
    by_id = {c.patient_id: c for c in site.cases}
    hist = {seq: (np.zeros(r.size - 1), np.zeros(p.size - 1)) for seq, (r, p) in edges.items()}
    cases = {seq: (np.zeros(r.size - 1), np.zeros(p.size - 1)) for seq, (r, p) in edges.items()}
    for pid in done:
        processed = {seq: find_image(out / "images" / pid, seq) for seq in study.intensity_sequences}
        missing = [seq for seq, path in processed.items() if path is None]
        if missing:
            raise SiteDataError(out / "images" / pid, f"preprocessed {missing} missing", "rerun preprocessing")
        before = _foreground_values({seq: by_id[pid].images[seq] for seq in study.intensity_sequences},
                                    study.reference_sequence)
        after = _foreground_values(processed, study.reference_sequence)  # type: ignore[arg-type]
        for seq, (raw_edges, std_edges) in edges.items():
            raw = np.histogram(np.clip(before[seq], raw_edges[0], raw_edges[-1]), raw_edges)[0]
            std = np.histogram(np.clip(after[seq], std_edges[0], std_edges[-1]), std_edges)[0]
            hist[seq][0][:] += raw
            hist[seq][1][:] += std
            cases[seq][0][:] += raw > 0
            cases[seq][1][:] += std > 0
    for seq, (raw, std) in hist.items():
        reply[f"{seq}/raw_hist"] = released_histogram(raw, cases[seq][0], policy.cell_floor)
        reply[f"{seq}/std_hist"] = released_histogram(std, cases[seq][1], policy.cell_floor)
    log.info("site %s: preprocessed %d case(s) into %s (%d failed)", site.site_id, len(done), out,
             len(report.failed))
    return reply


STEPS: dict[str, SiteStep] = {
    NYUL_LANDMARKS: SiteStep("preprocessing", nyul_landmarks_step),
    PLAN: SiteStep("preprocessing", store_plan_step),
    APPLY: SiteStep("preprocessing", apply_plan_step),
}
