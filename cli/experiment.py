"""``fedbiopsy experiment ...``: reproducible experiments over simulated hospitals."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Reproducible experiments over simulated hospitals.", no_args_is_help=True)
console = Console()
DEFAULT_OUT = Path("results/harmonisation")


@app.command("harmonisation")
def harmonisation(
    config: Annotated[Path | None, typer.Argument(help="Study YAML with an `experiment` section "
                                                        "(default: harmonisation.yaml).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Where the table, plot and sites go.")] = DEFAULT_OUT,
    sites_dir: Annotated[Path | None, typer.Option("--sites-dir", help="Existing site folders; simulated when "
                                                                       "absent.")] = None,
    patients: Annotated[int | None, typer.Option("--patients", min=4, help="Patients per simulated site "
                                                                           "(overrides config).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Simulation seed (overrides config).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Processes for feature extraction.")] = None,
) -> None:
    """The classifier without harmonisation, with image standardisation, with federated ComBat, and with both."""
    from common.config import DEFAULT_STUDY, load_study_config
    from simulations.experiment_harmonisation import CONDITION_LABELS, run_harmonisation_experiment

    path = config or DEFAULT_STUDY.with_name("harmonisation.yaml")
    study = load_study_config(path)
    changes = {k: v for k, v in {"patients": patients, "seed": seed, "workers": workers}.items() if v is not None}
    if changes:
        study = load_study_config(path,
                                  experiment={**study.experiment.model_dump(mode="json"), **changes})
    site_dirs = None
    if sites_dir is not None:
        site_dirs = sorted(p for p in sites_dir.iterdir() if (p / "site.yaml").is_file())
    result = run_harmonisation_experiment(study, out, site_dirs)
    table = Table(title=f"Harmonisation effect ({study.experiment.model}, study {study.hash[:12]})")
    for col in ("condition", "group", "n", "AUC (95% CI)", "accuracy (95% CI)", "sens.", "spec.", "Brier"):
        table.add_column(col)
    for r in result.rows:
        if r["group_kind"] not in ("pooled", "site", "field_strength"):
            continue
        def ci(m: str, r: dict = r) -> str:
            return f"{r[m]:.3f} ({r[m + '_lo']:.3f}-{r[m + '_hi']:.3f})" if r["group"] == "pooled" else f"{r[m]:.3f}"

        table.add_row(r["condition"], r["group"], str(r["n"]), ci("auc"),
                      ci("accuracy"), f"{r['sensitivity']:.3f}", f"{r['specificity']:.3f}", f"{r['brier']:.3f}")
    console.print(table)
    console.print("conditions: " + "; ".join(f"{k} = {v}" for k, v in CONDITION_LABELS.items()))
    for name, file in result.files.items():
        console.print(f"[green]{name}[/green]: {file}")
