"""``fedbiopsy ingest``: a folder of DICOM series to a site directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def ingest(
    dicom_dir: Annotated[Path, typer.Argument(help="Folder of DICOM files (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Site directory to write (site.yaml, clinical.csv, images/).")],
    mapping: Annotated[list[str], typer.Option(
        "--map", help="Series description to sequence, DESCRIPTION=SEQUENCE (case-insensitive; shell patterns "
        "such as '*t2*=T2w' allowed), repeatable; or a YAML file of description: sequence.")] = [],  # noqa: B006
    site_id: Annotated[str | None, typer.Option("--site-id", help="Site id (default: the output folder's name).")
                       ] = None,
    reference: Annotated[str | None, typer.Option("--reference", help="Reference sequence (default: the first "
                                                  "mapped).")] = None,
    field_strength: Annotated[float | None, typer.Option("--field-strength", help="Tesla, when the headers lack "
                                                         "it.")] = None,
    dce: Annotated[list[str], typer.Option(
        "--dce", help="A DCE.json value the headers do not hold, KEY=VALUE (Relaxivity_per_mM_s, T10_s, Hematocrit, "
        "InjectionTime_s, BaselineVolumes), repeatable.")] = [],  # noqa: B006
) -> None:
    """One sequence per DICOM series; exit status 1 when a series or patient could not be ingested."""
    from client.ingest import ingest_dicom, parse_mapping
    from common.errors import FedBiopsyError

    try:
        report = ingest_dicom(dicom_dir, out, parse_mapping(mapping), site_id, reference, field_strength,
                              _dce_values(dce))
    except FedBiopsyError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    for s in report.skipped_series:
        console.print(f"[yellow]skipped (unmapped)[/yellow] {s}")
    for p in report.problems:
        console.print(f"[red]problem[/red] {p}")
    console.print(f"[green]{len(report.written)} patient(s) ingested[/green] into {out}"
                  + ("" if report.written else " (nothing written)"))
    raise typer.Exit(0 if report.ok else (2 if not report.written else 1))


def _dce_values(items: list[str]) -> dict[str, object]:
    """``["Relaxivity_per_mM_s=4.5", "BaselineVolumes=5"]`` as numbers (an integer where it is one)."""
    from common.errors import ConfigError

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not key.strip() or number is None:
            raise ConfigError("--dce", f"{item!r} is not KEY=NUMBER", "write e.g. --dce Relaxivity_per_mM_s=4.5")
        out[key.strip()] = int(number) if key.strip() == "BaselineVolumes" else number
    return out
