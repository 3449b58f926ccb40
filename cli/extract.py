"""``fedbiopsy extract``: a site's radiomics table, in parallel over cases, with a progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def _parse_spacing(spacing: str | None, plan: Path | None) -> tuple[float, float, float] | None:
    if spacing and plan:
        raise typer.BadParameter("give --spacing or --plan, not both")
    if plan is not None:
        try:
            data = json.loads(plan.read_text(encoding="utf-8"))
            values = data["target_spacing"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise typer.BadParameter(f"{plan}: no target_spacing ({exc}); pass the fingerprint.json of a study run",
                                     param_hint="--plan") from exc
    elif spacing:
        values = spacing.replace("x", ",").split(",")
    else:
        return None
    try:
        x, y, z = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(f"{values!r} is not three spacings in mm (x,y,z)", param_hint="--spacing") from exc
    if min(x, y, z) <= 0:
        raise typer.BadParameter("spacings must be positive", param_hint="--spacing")
    return (x, y, z)


def extract(
    site_dir: Annotated[Path, typer.Argument(help="A site directory (site.yaml, clinical.csv, images/, masks/).")],
    out: Annotated[Path, typer.Option("--out", help="Feature table to write (CSV; a .json with the settings, "
                                      "their hash and the failed cases is written beside it).")],
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes (cases in parallel).")] = 2,
    settings: Annotated[str, typer.Option("--settings", help="Radiomics settings: a packaged name or a YAML path."
                                          )] = "default",
    spacing: Annotated[str | None, typer.Option("--spacing", help="Resampling spacing x,y,z in mm where the "
                                                "settings say `plan` (default: each image's native grid).")] = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="fingerprint.json of a study run: use its target "
                                              "spacing.")] = None,
    study_path: Annotated[Path | None, typer.Option("--study", help="Study YAML whose maps section (DWI/DCE maps) "
                                                    "to use; default: the packaged one.")] = None,
) -> None:
    """Radiomics of every valid case and sequence of a site (columns `<sequence>_<feature>`).

    A case that fails is listed with its reason and the others complete; exit status 1 when any case failed,
    2 when nothing could be extracted.
    """
    from rich.table import Table

    from client.features.table import extract_cases
    from client.maps import ensure_site_maps
    from common.config import load_study_config
    from common.errors import ConfigError
    from common.features.settings import load_radiomics_settings
    from common.validation import load_site

    target = _parse_spacing(spacing, plan)
    try:
        site = load_site(site_dir)
        rad = load_radiomics_settings(settings)
    except ConfigError as err:
        console.print(f"[red]error[/red] {err}")
        raise typer.Exit(2) from err
    study = load_study_config(study_path) if study_path else load_study_config(
        None, sequences=list(site.config.sequences), reference_sequence=site.config.reference_sequence)
    site = ensure_site_maps(site, study)  # 4D series (DWI, DCE): their maps are the channels
    table = extract_cases(site.cases, study.channels, rad, target, workers=workers, progress=True)
    table.write(out)
    console.print(f"[green]{len(table.frame)} case(s)[/green] x {table.frame.shape[1]} feature(s) -> {out} "
                  f"(settings {rad.name or settings} v{rad.version}, sha256 {table.settings_hash[:12]})")
    if table.failures:
        failed = Table(title=f"{len(table.failures)} case(s) without features")
        failed.add_column("patient")
        failed.add_column("reason", overflow="fold")
        for pid, reason in table.failures.items():
            failed.add_row(pid, reason)
        console.print(failed)
    if table.frame.empty:
        raise typer.Exit(2)
    raise typer.Exit(1 if table.failures else 0)
