"""``fedbiopsy preprocess``: a site's cases through the preprocessing pipeline, in parallel, with a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from common.config import StudyConfig
    from common.plan import PreprocessingPlan

console = Console()


def _study(site_dir: Path, config: Path | None, plan_path: Path | None) -> tuple[StudyConfig, PreprocessingPlan | None]:
    """The study config and plan to use: --config wins; else the plan's settings; else the site's sequences."""
    from common.config import load_study_config
    from common.plan import load_plan
    from common.sitedata import load_site_config

    plan = load_plan(plan_path) if plan_path else None
    if config is not None:
        study = load_study_config(config)
    elif plan is not None:
        study = load_study_config(None, sequences=list(plan.sequences), reference_sequence=plan.reference_sequence,
                                  preprocessing=plan.preprocessing.model_dump(mode="json"))
    else:
        site = load_site_config(site_dir)
        study = load_study_config(None, sequences=list(site.sequences), reference_sequence=site.reference_sequence)
    return study, plan


def preprocess(
    site_dir: Annotated[Path, typer.Argument(help="A site directory (site.yaml, clinical.csv, images/, masks/).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the preprocessed site (a valid site directory "
                                      "plus histories/, plan.json and preprocessing.json).")],
    config: Annotated[Path | None, typer.Option("--config", help="Study YAML whose `preprocessing` section to "
                                                "use (default: the plan's settings, else the defaults).")] = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="plan.json of the preprocessing phase (target "
                                              "spacing, federated Nyúl landmarks); without it the site learns "
                                              "a site-local plan.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes (cases in parallel).")] = 2,
) -> None:
    """Denoise, correct the bias field, register, resample and normalise every valid case of a site.

    A case that fails is listed with its reason and the others complete; exit status 1 when any case failed,
    2 when none completed.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from client.preprocessing.cohort import CaseOutcome, CohortProgress, preprocess_site
    from common.errors import FedBiopsyError

    class _Bar(CohortProgress):
        def __init__(self, bar: Progress) -> None:
            self.bar = bar
            self.task: TaskID | None = None

        def stage(self, description: str, total: int) -> None:
            self.task = self.bar.add_task(description, total=total)

        def advance(self, outcome: CaseOutcome) -> None:
            if self.task is not None:
                self.bar.advance(self.task)
            if not outcome.ok:
                self.bar.console.print(f"[red]failed[/red] {outcome.patient_id}: {outcome.reason}")

    try:
        study, loaded_plan = _study(site_dir, config, plan)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as bar:
            report = preprocess_site(site_dir, out, study, loaded_plan, workers=workers, progress=_Bar(bar))
    except FedBiopsyError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    if report.failed:
        table = Table(title=f"{len(report.failed)} case(s) skipped")
        table.add_column("patient")
        table.add_column("reason", overflow="fold")
        for pid, reason in sorted(report.failed.items()):
            table.add_row(pid, reason)
        console.print(table)
    n = len(report.completed)
    per_case = sum(o.seconds for o in report.completed.values()) / max(n, 1)
    kind = "site-local" if report.plan.site_local else "federated"
    console.print(f"[green]{n} case(s) preprocessed[/green] into {out} in {report.seconds:.1f} s "
                  f"({per_case:.2f} s per case, {workers} worker(s)); {kind} plan {report.plan_sha256[:12]}")
    raise typer.Exit(2 if n == 0 else (1 if report.failed else 0))
