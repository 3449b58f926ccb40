"""``fedbiopsy compare-masks A_DIR B_DIR`` (two mask sets) and ``fedbiopsy segmentation-study RESULTS`` (a study's
federated variability tables), as the seed's variability tables."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def compare_masks(
    a_dir: Annotated[Path, typer.Argument(help="Reference masks (<case>.nii.gz), e.g. radiologist 1.")],
    b_dir: Annotated[Path, typer.Argument(help="Masks to compare, same file names, e.g. the automatic ones.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write per-case metrics as JSON.")] = None,
) -> None:
    """DSC, voxel AUC, FPR, FNR and HD95 of B against A: median, IQR, mean and SD over the common cases."""
    from common.errors import FedBiopsyError
    from common.segmentation.compare import as_rows, compare_mask_dirs

    try:
        result = compare_mask_dirs(a_dir, b_dir)
    except FedBiopsyError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    table = Table(title=f"{b_dir} vs {a_dir} (reference): {len(result.per_case)} case(s)")
    for col in ("metric", "n", "median", "IQR (q25-q75)", "mean", "SD"):
        table.add_column(col)
    for row in as_rows(result.summary):
        table.add_row(str(row["metric"]), f"{row['n']:.0f}", f"{row['median']:.3f}",
                      f"{row['iqr']:.3f} ({row['q25']:.3f}-{row['q75']:.3f})", f"{row['mean']:.3f}",
                      f"{row['sd']:.3f}")
    console.print(table)
    if result.only_a or result.only_b:
        console.print(f"[yellow]unmatched:[/yellow] only in A {result.only_a}, only in B {result.only_b}")
    if json_out:
        def clean(v: float) -> float | None:
            return v if math.isfinite(v) else None

        json_out.write_text(json.dumps({
            "reference": str(a_dir), "compared": str(b_dir),
            "per_case": {c: {k: clean(v) for k, v in m.items()} for c, m in result.per_case.items()},
            "summary": result.summary, "only_a": result.only_a, "only_b": result.only_b,
        }, indent=2))


def segmentation_study(
    results: Annotated[Path, typer.Argument(help="A study's result folder (holding inference.json).")],
) -> None:
    """The seed's segmentation study of a finished study: inter-observer and automatic variability tables (DSC,
    AUC ROC, 1-FPR, 1-FNR: median, IQR, mean, SD) merged from the sites' aggregates, and the time leverage."""
    path = results / "inference.json"
    if not path.is_file():
        console.print(f"[red]error:[/red] {path}: not found. Fix: pass the result folder of a study that ran the "
                      "inference phase (make demo writes demo-output/study)")
        raise typer.Exit(2)
    study = json.loads(path.read_text()).get("segmentation_study")
    if not study:
        console.print(f"[red]error:[/red] {path}: the study ran without the segmentation study. Fix: set "
                      "segmentation.variability_tables: true and give cases further raters' masks (raters/)")
        raise typer.Exit(2)
    for name in ("inter", "auto"):
        t = study["tables"][name]
        if not t["rows"]:
            console.print(f"[yellow]{t['title']}: withheld (no site had enough rated cases)[/yellow]")
            continue
        table = Table(title=f"{t['title']} (n={t['n_cases']}, sites: {', '.join(t['sites'])})")
        for col in t["rows"][0]:
            table.add_column(col)
        for row in t["rows"]:
            table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
        console.print(table)
    console.print("[dim]n, mean and SD are exact over the pooled cases; median and IQR are the case-weighted mean "
                  "of the sites' (a site with fewer than 4 x its smallest cell + 2 cases sends its mean for every "
                  "quartile: IQR 0).[/dim]")
    lev = study.get("time_leverage")
    if lev:
        console.print(f"Time leverage: {study['model_seconds_per_case']:.2f} s per case by the model vs "
                      f"{study['manual_seconds_per_case']:.0f} s by hand: {lev:.0f}x")
