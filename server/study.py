"""Orchestration of a study's phases on the server, over the sites of a :class:`server.federation.Federation`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from common.config import StudyConfig
from common.errors import ConfigError
from server.federation import Federation
from server.phases import PHASES, PhaseContext
from server.registry import Registry, open_registry
from server.registry.verify import format_head

log = logging.getLogger("fedbiopsy.server")
HEAD_FILE = "registry-head.txt"  # the audit head after the run, <seq>:<sha256>, for `registry verify --head`


def run_study(federation: Federation, result_dir: Path) -> dict:
    """Run the study's phases in order; each phase's result is written to ``result_dir/<phase>.json``.

    The study, the run, each phase with its participating sites and every artifact a phase lists are recorded
    in the study's registry (:func:`open_study_registry`); a run that fails is recorded as failed. The audit
    head after the run (``<seq>:<sha256>``) goes into ``study.json`` and ``registry-head.txt``: published
    outside the database, it makes ``fedbiopsy registry verify --head`` catch a later truncation or rewrite.
    """
    study = federation.study
    unknown = [p for p in study.phases if p not in PHASES]
    if unknown:
        raise ConfigError("study config", f"unknown phase(s) {unknown}", f"use phases among {list(PHASES)}")
    result_dir.mkdir(parents=True, exist_ok=True)
    with open_study_registry(study, result_dir) as registry:
        run_id = registry.start_run(study, result_dir)
        try:
            node_ids = federation.wait(study.min_sites)
            log.info("study %s (%s): %d site(s) connected", study.name, study.hash[:12], len(node_ids))
            ctx = PhaseContext(federation=federation, study=study, result_dir=result_dir, registry=registry,
                               run_id=run_id)
            versions: list[str] = []
            seconds: dict[str, float] = {}
            for phase in study.phases:
                log.info("phase %s: start", phase)
                started = time.perf_counter()
                ctx.outputs[phase] = PHASES[phase](ctx)
                seconds[phase] = round(time.perf_counter() - started, 2)
                (result_dir / f"{phase}.json").write_text(json.dumps(ctx.outputs[phase], indent=2, default=str))
                registered = registry.record_phase(run_id, phase, ctx.outputs[phase], ctx.participants.get(phase, {}),
                                                   result_dir)
                versions += [v.label for v in registered]
                log.info("phase %s: done; registered %s", phase, [v.label for v in registered] or "nothing")
        except BaseException as exc:
            _close_run(registry, run_id, f"{type(exc).__name__}: {exc}")
            raise
        registry.finish_run(run_id)
        head = format_head(registry.head())  # after the run's last event: publish it to pin the log
    summary = {"study": study.name, "study_hash": study.hash, "phases": list(study.phases),
               "participants": ctx.participants, "outputs": ctx.outputs, "phase_seconds": seconds,
               "registry": {"location": registry.location.describe(), "run_id": run_id, "versions": versions,
                            "head": head}}
    (result_dir / "study.json").write_text(json.dumps(summary, indent=2, default=str))
    (result_dir / HEAD_FILE).write_text(head + "\n", encoding="utf-8")
    log.info("registry head after run %d: %s (check it with `fedbiopsy registry verify --head %s`)", run_id, head,
             head)
    return summary


def open_study_registry(study: StudyConfig, result_dir: Path) -> Registry:
    """The study's registry: ``study.registry.folder`` (default ``<result_dir>/../registry``) and optional URL."""
    cfg = study.registry
    folder = Path(cfg.folder) if cfg.folder else Path(result_dir).resolve().parent / "registry"
    return open_registry(folder, url=cfg.url or None)


def _close_run(registry: Registry, run_id: int, error: str) -> None:
    try:
        registry.finish_run(run_id, error=error)
    except Exception:  # noqa: BLE001 - never hide the error that failed the run
        log.exception("registry: could not mark run %d as failed", run_id)
