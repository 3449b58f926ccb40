"""Preprocess a whole site in parallel: one process per case at a time, a failing case reported and skipped.

The output is again a valid site directory (``site.yaml``, ``clinical.csv`` of the completed cases, images,
masks) plus ``histories/<patient>.json`` (one provenance record per case), ``plan.json`` (the plan used) and
``preprocessing.json`` (per-case history hashes, timings and failures).

With the federated plan (``plan``) every case runs the whole pipeline in one pass. Without one the site
learns a *site-local* plan: the target spacing is the median of its own cases' spacings and, for Nyúl
standardisation, the landmarks come from its own cases (first pass up to normalisation, then the standard
scale, then a second pass applying it).

A site that took part in the federated Nyúl round already ran every case up to normalisation: those volumes
are kept as a *stage* (``stage_dir``: images, mask and the steps so far, under a key of the settings, the target
spacing and the input files' hashes) and the apply pass only normalises them, with the same result as a full
pass (float32 NIfTI round-trips exactly). A stage whose key differs is ignored.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from client.maps import maps_dir, site_with_maps
from client.preprocessing.base import CaseVolumes, library_version
from client.preprocessing.normalise import NyulStandardise, nyul_case_landmarks
from client.preprocessing.pipeline import (
    build_pipeline,
    history_document,
    load_case,
    normalisation_step,
    read_history,
    write_case,
    write_history,
)
from common.config import PreprocessingConfig, StudyConfig
from common.errors import ConfigError, SiteDataError
from common.hashing import canonical_json, sha256_file, sha256_text
from common.nyul import aggregate_nyul, site_nyul
from common.plan import NyulPlan, PreprocessingPlan, build_plan, settings_hash, write_plan
from common.sitedata import Case, Site, SiteConfig, read_clinical, write_site_config
from common.validation import CaseReport, Problem, load_site, validate_site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseJob:
    """Everything a worker process needs for one case (picklable)."""

    case: Case
    site_id: str
    out_dir: Path
    sequences: tuple[str, ...]
    reference: str
    config_json: str
    target_spacing: tuple[float, float, float] | None
    nyul: NyulPlan | None
    include_normalise: bool
    plan_sha256: str | None
    study_hash: str
    stage_dir: Path | None = None


@dataclass
class CaseOutcome:
    """What happened to one case."""

    patient_id: str
    ok: bool
    reason: str = ""
    seconds: float = 0.0
    history_sha256: str | None = None
    landmarks: dict[str, list[float]] | None = None  # first pass of a site-local Nyúl plan only; stays here


@dataclass
class CohortReport:
    """The result of preprocessing a site."""

    out_dir: Path
    plan: PreprocessingPlan
    plan_sha256: str
    completed: dict[str, CaseOutcome] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 1

    def summary(self) -> dict[str, Any]:
        return {
            "plan_sha256": self.plan_sha256, "site_local_plan": self.plan.site_local,
            "settings_hash": self.plan.settings_hash, "workers": self.workers, "seconds": round(self.seconds, 3),
            "cases": {pid: {"history_sha256": o.history_sha256, "seconds": round(o.seconds, 3)}
                      for pid, o in sorted(self.completed.items())},
            "failed": dict(sorted(self.failed.items())),
        }


class CohortProgress:
    """Progress hooks (no-op here; the CLI draws a progress bar)."""

    def stage(self, description: str, total: int) -> None:
        """A stage of ``total`` cases starts."""

    def advance(self, outcome: CaseOutcome) -> None:
        """One case of the current stage is done (or failed)."""


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))
    logging.basicConfig(level=logging.WARNING)


def _remove_outputs(out_dir: Path, patient_id: str) -> None:
    shutil.rmtree(out_dir / "images" / patient_id, ignore_errors=True)
    for p in (out_dir / "masks").glob(f"{patient_id}.*"):
        p.unlink(missing_ok=True)
    (out_dir / "histories" / f"{patient_id}.json").unlink(missing_ok=True)


def _inputs(case: Case, sequences: Sequence[str]) -> dict[str, Path]:
    paths = {seq: case.images[seq] for seq in sequences}
    if case.mask is not None:
        paths["mask"] = case.mask
    return paths


STAGE_FORMAT = "fedbiopsy-stage/1"


def stage_key(case: Case, sequences: Sequence[str], config: PreprocessingConfig,
              target_spacing: Sequence[float] | None, study_hash: str) -> str:
    """What a staged case depends on: the study (its sequences and reference), the settings, the target spacing,
    the input files and this fedbiopsy's version."""
    return sha256_text(canonical_json({
        "format": STAGE_FORMAT, "study": study_hash, "fedbiopsy": library_version("fedbiopsy"),
        "settings": settings_hash(config),
        "spacing": [float(v) for v in target_spacing] if target_spacing is not None else None,
        "inputs": {k: sha256_file(v) for k, v in sorted(_inputs(case, sequences).items())}}))


def write_stage(volumes: CaseVolumes, stage_dir: Path, key: str) -> None:
    """Keep a case's volumes before normalisation (and the steps that made them) for the apply pass."""
    write_case(volumes, stage_dir)
    record = {"format": STAGE_FORMAT, "key": key, "steps": list(volumes.history)}
    (stage_dir / "histories").mkdir(parents=True, exist_ok=True)
    (stage_dir / "histories" / f"{volumes.patient_id}.json").write_text(canonical_json(record), encoding="utf-8")


def read_stage(case: Case, stage_dir: Path, key: str, sequences: Sequence[str], reference: str) -> CaseVolumes | None:
    """The staged volumes of a case, None when absent or made from other settings, spacing or files."""
    path = stage_dir / "histories" / f"{case.patient_id}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != STAGE_FORMAT or record.get("key") != key:
        return None
    images = {s: sitk.ReadImage(str(stage_dir / "images" / case.patient_id / f"{s}.nii.gz")) for s in sequences}
    mask_path = stage_dir / "masks" / f"{case.patient_id}.nii.gz"
    mask = sitk.ReadImage(str(mask_path)) if case.mask is not None and mask_path.is_file() else None
    if case.mask is not None and mask is None:
        return None
    return CaseVolumes(case.patient_id, images, mask, reference, tuple(record["steps"]))


def _volumes(job: CaseJob, config: PreprocessingConfig) -> CaseVolumes:
    """The case through the pipeline; from its stage when one matches (then only normalised)."""
    if job.stage_dir is not None and job.include_normalise:
        key = stage_key(job.case, job.sequences, config, job.target_spacing, job.study_hash)
        staged = read_stage(job.case, job.stage_dir, key, job.sequences, job.reference)
        if staged is not None:
            if "normalise" not in config.steps:
                return staged
            return normalisation_step(config, job.nyul)(staged)
    pipeline = build_pipeline(config, job.target_spacing, job.nyul, job.include_normalise)
    return pipeline(load_case(job.case, job.sequences, job.reference))


def process_case(job: CaseJob) -> CaseOutcome:
    """Run the pipeline on one case and write its outputs and history; never raises."""
    start = time.perf_counter()
    pid = job.case.patient_id
    try:
        config = PreprocessingConfig.model_validate_json(job.config_json)
        volumes = _volumes(job, config)
        outputs = write_case(volumes, job.out_dir)
        doc = history_document(volumes, job.site_id, _inputs(job.case, job.sequences), outputs, job.plan_sha256,
                               settings_hash(config), job.study_hash)
        sha = write_history(doc, job.out_dir / "histories" / f"{pid}.json")
        landmarks = None
        if not job.include_normalise and "normalise" in config.steps:
            own = nyul_case_landmarks(volumes, config.normalise.nyul_percentiles)
            landmarks = {k: v.tolist() for k, v in own.items()}
        return CaseOutcome(pid, True, seconds=time.perf_counter() - start, history_sha256=sha, landmarks=landmarks)
    except Exception as err:  # noqa: BLE001 - one bad case never stops the cohort
        _remove_outputs(job.out_dir, pid)
        return CaseOutcome(pid, False, reason=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class NyulJob:
    """The second pass of a site-local Nyúl plan: standardise a case already written by the first pass."""

    patient_id: str
    out_dir: Path
    sequences: tuple[str, ...]
    reference: str
    nyul: NyulPlan
    plan_sha256: str


def apply_nyul(job: NyulJob) -> CaseOutcome:
    """Standardise a written case with the site-local landmarks and extend its history; never raises."""
    start = time.perf_counter()
    pid = job.patient_id
    try:
        hist_path = job.out_dir / "histories" / f"{pid}.json"
        doc = read_history(hist_path)
        images = {s: sitk.ReadImage(str(job.out_dir / "images" / pid / f"{s}.nii.gz")) for s in job.sequences}
        volumes = CaseVolumes(pid, images, None, job.reference, tuple(doc["steps"]))
        volumes = NyulStandardise(tuple(job.nyul.percentiles), dict(job.nyul.landmarks))(volumes)
        outputs = write_case(volumes, job.out_dir)
        mask = job.out_dir / "masks" / f"{pid}.nii.gz"
        if mask.is_file():
            outputs["mask"] = mask
        doc["steps"] = list(volumes.history)
        doc["plan_sha256"] = job.plan_sha256
        doc["outputs"] = {k: {"file": p.name, "sha256": sha256_file(p)} for k, p in sorted(outputs.items())}
        sha = write_history(doc, hist_path)
        return CaseOutcome(pid, True, seconds=time.perf_counter() - start, history_sha256=sha)
    except Exception as err:  # noqa: BLE001
        _remove_outputs(job.out_dir, pid)
        return CaseOutcome(pid, False, reason=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - start)


def _pool(workers: int, n_jobs: int) -> ProcessPoolExecutor | None:
    """A pool of ``workers`` spawned processes (ITK threads shared out between them); None for serial runs."""
    if workers <= 1 or n_jobs <= 1:
        return None
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))


def _run(fn: Callable[[Any], CaseOutcome], jobs: Sequence[Any], pool: ProcessPoolExecutor | None,
         progress: CohortProgress) -> list[CaseOutcome]:
    outcomes: list[CaseOutcome] = []
    if pool is None:
        for job in jobs:
            outcomes.append(fn(job))
            progress.advance(outcomes[-1])
        return outcomes
    futures: list[Future[CaseOutcome]] = [pool.submit(fn, job) for job in jobs]
    for fut in as_completed(futures):
        outcomes.append(fut.result())
        progress.advance(outcomes[-1])
    return outcomes


def median_spacing(cases: Iterable[Case], reference: str) -> tuple[float, float, float]:
    """The per-axis median spacing of the cases' reference images (read from the headers only)."""
    spacings = []
    for case in cases:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(case.images[reference]))
        reader.ReadImageInformation()
        spacings.append(reader.GetSpacing())
    if not spacings:
        raise SiteDataError("site", "no valid case to measure the spacing of", "fix the cases `validate` lists")
    return tuple(float(v) for v in np.median(np.asarray(spacings), axis=0))  # type: ignore[return-value]


def _check_plan(plan: PreprocessingPlan, study: StudyConfig) -> None:
    """A plan given to :func:`preprocess_site` must come from this study's preprocessing settings and sequences."""
    if plan.settings_hash != settings_hash(study.preprocessing):
        raise ConfigError("plan", "was built with other preprocessing settings than the study config's",
                          "pass the study config the plan was built with (or omit --config)")
    if tuple(plan.sequences) != tuple(study.sequences):
        raise ConfigError("plan", f"covers sequences {list(plan.sequences)}, the study {list(study.sequences)}",
                          "use the plan of this study")


def _map_failures(site: Site, problems: dict[str, str]) -> list[CaseReport]:
    """Reports for the cases whose maps could not be made, with their reasons (also in ``derived/maps/maps.json``)."""
    out = []
    for pid, problem in sorted(problems.items()):
        cr = CaseReport(pid)
        cr.problems.append(Problem(str(maps_dir(site.root)), f"its parametric maps could not be fitted: {problem}",
                                   "fix the 4D series it names"))
        out.append(cr)
    return out


def preprocess_site(site_dir: Path | str, out_dir: Path | str, study: StudyConfig,
                    plan: PreprocessingPlan | None = None, workers: int = 2,
                    progress: CohortProgress | None = None, stage_dir: Path | None = None) -> CohortReport:
    """Preprocess every valid case of a site into ``out_dir`` (see the module docstring; ``stage_dir``: volumes
    kept before normalisation, see :func:`write_stage`)."""
    started = time.perf_counter()
    progress = progress or CohortProgress()
    src, out = Path(site_dir), Path(out_dir)
    if src.resolve() == out.resolve():
        raise ConfigError(out, "the output folder is the site folder", "write the preprocessed site elsewhere")
    report = validate_site(src)
    if report.site_problems:
        raise SiteDataError(src, "; ".join(str(p) for p in report.site_problems), "fix the site (fedbiopsy validate)")
    site = load_site(src)
    missing = [s for s in study.sequences if s not in site.config.sequences]
    if missing:
        raise ConfigError(src / "site.yaml", f"the study needs sequence(s) {missing}",
                          f"add them to the site or run a study over {list(site.config.sequences)}")
    site, map_problems = site_with_maps(site, study)  # 4D series -> maps (derived/maps/); failed cases left out
    report.cases.extend(_map_failures(site, map_problems))
    config = study.preprocessing
    if plan is not None:
        _check_plan(plan, study)
    failed = {cr.patient_id: "; ".join(str(p) for p in cr.problems) for cr in report.cases if not cr.valid}
    for pid, reason in failed.items():
        log.warning("case %s skipped: %s", pid, reason)
    out.mkdir(parents=True, exist_ok=True)
    needs_nyul = "normalise" in config.steps and config.normalise.method == "nyul"
    if plan is None:
        spacing = config.resample.target_spacing or median_spacing(site.cases, study.reference_sequence)
        plan = build_plan(study, spacing, None, {site.site_id: len(site.cases)}, site_local=True)
        log.warning("no plan given: learning a site-local plan (target spacing %s)%s", spacing,
                    ", site-local Nyúl landmarks" if needs_nyul else "")
    two_pass = needs_nyul and plan.nyul is None
    plan_sha = "" if two_pass else write_plan(plan, out / "plan.json")
    jobs = [CaseJob(c, site.site_id, out, tuple(study.channels), study.reference_sequence,
                    config.model_dump_json(), plan.target_spacing, plan.nyul, not two_pass, plan_sha or None,
                    study.hash, stage_dir) for c in site.cases]
    with ExitStack() as stack:
        pool = _pool(workers, len(jobs))
        if pool is not None:
            stack.enter_context(pool)
        progress.stage("Preprocessing" if not two_pass else "Preprocessing (before Nyúl)", len(jobs))
        outcomes = _run(process_case, jobs, pool, progress)
        if two_pass:
            plan, plan_sha, outcomes = _site_local_nyul(src, out, site.site_id, study, plan, outcomes, pool, progress)
    result = CohortReport(out, plan, plan_sha, workers=workers)
    for o in outcomes:
        if o.ok:
            result.completed[o.patient_id] = o
        else:
            failed[o.patient_id] = o.reason
            log.warning("case %s failed: %s", o.patient_id, o.reason)
    result.failed = failed
    _write_site_files(src, out, site.config, study, sorted(result.completed))
    result.seconds = time.perf_counter() - started
    (out / "preprocessing.json").write_text(canonical_json(result.summary()), encoding="utf-8")
    return result


def _site_local_nyul(src: Path, out: Path, site_id: str, study: StudyConfig, plan: PreprocessingPlan,
                     outcomes: list[CaseOutcome], pool: ProcessPoolExecutor | None,
                     progress: CohortProgress) -> tuple[PreprocessingPlan, str, list[CaseOutcome]]:
    """Learn the site-local Nyúl scale from the first pass, then standardise every case that passed it."""
    config = study.preprocessing
    done = [o for o in outcomes if o.ok]
    if not done:
        raise SiteDataError(src, "every case failed; no site-local Nyúl landmarks can be learnt",
                            "see the reasons listed per case")
    payload = site_nyul(site_id, [{k: np.asarray(v) for k, v in (o.landmarks or {}).items()} for o in done],
                        study.intensity_sequences, config.normalise.nyul_percentiles, config.normalise.nyul_scale, 1)
    nyul = aggregate_nyul({site_id: payload}, study.intensity_sequences)
    plan = build_plan(study, plan.target_spacing, nyul, {site_id: len(done)}, site_local=True)
    plan_sha = write_plan(plan, out / "plan.json")
    standard = NyulPlan(percentiles=tuple(nyul["percentiles"]), scale=tuple(nyul["scale"]),
                        landmarks={k: tuple(v) for k, v in nyul["landmarks"].items()})
    second = [NyulJob(o.patient_id, out, tuple(study.channels), study.reference_sequence, standard, plan_sha)
              for o in done]
    progress.stage("Nyúl standardisation (site-local)", len(second))
    first_seconds = {o.patient_id: o.seconds for o in done}
    outcomes = [o for o in outcomes if not o.ok] + _run(apply_nyul, second, pool, progress)
    for o in outcomes:
        o.seconds += first_seconds.get(o.patient_id, 0.0)
    return plan, plan_sha, outcomes


def _write_site_files(src: Path, out: Path, config: SiteConfig, study: StudyConfig, completed: list[str]) -> None:
    write_site_config(config.model_copy(update={"sequences": tuple(study.channels),
                                                "reference_sequence": study.reference_sequence}), out)
    clinical = read_clinical(src)
    clinical[clinical["patient_id"].isin(completed)].to_csv(out / "clinical.csv", index=False)
