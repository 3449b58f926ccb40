"""A site's radiomics table: every case and sequence, in parallel over cases, one failing case never stopping the rest.

Columns are ``<sequence>_<pyradiomics name>`` (``T2w_original_glcm_JointEnergy``), in the order of the sequences
and then of :func:`client.features.radiomics.extract`; rows are patients (index ``patient_id``, sorted). The
values do not depend on the number of worker processes. The table stays at the site (``derived/features.csv``
with a JSON sidecar holding the resolved settings, their hash and the failed cases).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from client.features.worker import PRELOAD, CaseJob, CaseResult, extract_case, init_worker
from common.features.settings import RadiomicsSettings, settings_hash
from common.sitedata import Case

log = logging.getLogger(__name__)


@dataclass
class FeatureTable:
    """A site's feature table with its provenance."""

    frame: pd.DataFrame
    failures: dict[str, str]
    settings: dict[str, Any]
    settings_hash: str
    sequences: tuple[str, ...] = field(default=())

    def write(self, path: Path | str, inputs: Mapping[str, Any] | None = None) -> Path:
        """Write ``path`` (CSV, full float precision) and ``path`` with ``.json`` (settings, hash, failures, and
        ``inputs``: which images the features were computed on)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.frame.to_csv(path, index=True, float_format=None)
        self.sidecar(path).write_text(json.dumps({
            "settings_hash": self.settings_hash,
            "settings": self.settings,
            "sequences": list(self.sequences),
            "n_cases": int(len(self.frame)),
            "n_features": int(self.frame.shape[1]),
            "failures": self.failures,
            **dict(inputs or {"inputs": "raw"}),
        }, indent=2), encoding="utf-8")
        return path

    @staticmethod
    def sidecar(path: Path | str) -> Path:
        """The JSON file written beside a feature CSV."""
        return Path(path).with_suffix(".json")


def make_jobs(cases: Sequence[Case], sequences: Sequence[str], settings: RadiomicsSettings,
              spacing: Sequence[float] | None) -> tuple[list[CaseJob], dict[str, str]]:
    """One job per case that has every sequence; the others are returned as failures with their reason."""
    per_seq = {seq: settings.for_sequence(seq, spacing) for seq in sequences}
    jobs, failures = [], {}
    for case in sorted(cases, key=lambda c: c.patient_id):
        missing = [seq for seq in sequences if seq not in case.images]
        if missing:
            failures[case.patient_id] = f"sequence(s) {missing} missing (add them or leave them out of the study)"
            continue
        jobs.append(CaseJob(case.patient_id, {seq: str(case.images[seq]) for seq in sequences},
                            str(case.mask) if case.mask is not None else None, per_seq, settings.label))
    return jobs, failures


def run_jobs(jobs: Sequence[CaseJob], workers: int = 1, progress: bool = False) -> list[CaseResult]:
    """Run jobs in-process (``workers`` 1) or in a pool of spawned processes; results in job order."""
    workers = max(1, min(int(workers), len(jobs)))
    results: dict[str, CaseResult] = {}
    bar = _progress(progress)
    with bar:
        task = bar.add_task("radiomics", total=len(jobs))
        if workers == 1:
            for job in jobs:
                results[job.patient_id] = extract_case(job)
                bar.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_context(),
                                     initializer=init_worker) as pool:
                futures = {pool.submit(extract_case, job): job for job in jobs}
                for future in as_completed(futures):
                    job = futures[future]
                    try:
                        results[job.patient_id] = future.result()
                    except Exception as exc:  # a crashed worker must not stop the cohort
                        results[job.patient_id] = CaseResult(job.patient_id, None, f"worker failed: {exc!r}")
                    bar.advance(task)
    return [results[job.patient_id] for job in jobs]


def _context() -> multiprocessing.context.BaseContext:
    """Worker processes that inherit no threads or state: a fork server that has imported the worker module
    once (cheap forks afterwards), or spawned interpreters where there is no fork server (Windows)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        return ctx
    return multiprocessing.get_context("spawn")


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def assemble(results: Sequence[CaseResult], sequences: Sequence[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """The feature frame (rows sorted by patient, columns in a fixed order) and the failures."""
    rows = {r.patient_id: r.features for r in results if r.features is not None}
    failures = {r.patient_id: str(r.reason) for r in results if r.features is None}
    for r in results:
        for message in r.messages:
            log.warning("case %s: pyradiomics %s", r.patient_id, message)
    columns: list[str] = []
    seen: set[str] = set()
    for seq in sequences:  # first appearance order, per sequence; identical for every case with one setting
        for row in rows.values():
            for name in row:
                if name.startswith(f"{seq}_") and name not in seen:
                    seen.add(name)
                    columns.append(name)
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=columns) if rows else pd.DataFrame(columns=columns)
    frame = frame.sort_index()
    frame.index.name = "patient_id"
    return frame, failures


def extract_cases(cases: Sequence[Case], sequences: Sequence[str], settings: RadiomicsSettings,
                  spacing: Sequence[float] | None = None, workers: int = 1, progress: bool = False) -> FeatureTable:
    """The radiomics table of ``cases``: every sequence of every case, failing cases listed with their reason.

    ``spacing`` (x, y, z mm) is the plan's target spacing, used where the settings say ``plan``.
    """
    sequences = tuple(sequences)
    if spacing is None and any(settings.uses_plan(seq) for seq in sequences):
        log.warning("no plan spacing given: radiomics on each image's native grid (features of sites with "
                    "different spacings are then not comparable)")
    jobs, failures = make_jobs(cases, sequences, settings, spacing)
    frame, job_failures = assemble(run_jobs(jobs, workers=workers, progress=progress), sequences)
    failures.update(job_failures)
    for pid, reason in sorted(failures.items()):
        log.debug("case %s: no features: %s", pid, reason)
    if failures:
        log.warning("%d of %d case(s) without features: %s (reasons in the table's JSON sidecar)", len(failures),
                    len(cases), ", ".join(sorted(failures)))
    resolved = settings.resolve(sequences, spacing)
    return FeatureTable(frame, dict(sorted(failures.items())), resolved, settings_hash(resolved), sequences)


def read_feature_table(path: Path | str) -> pd.DataFrame:
    """A feature CSV written by :meth:`FeatureTable.write` (index ``patient_id`` as strings)."""
    return pd.read_csv(path, index_col="patient_id", dtype={"patient_id": str}, float_precision="round_trip")


def feature_provenance(path: Path | str) -> Mapping[str, Any]:
    """The sidecar JSON of a feature CSV (settings, their hash, failures)."""
    return json.loads(FeatureTable.sidecar(path).read_text(encoding="utf-8"))
