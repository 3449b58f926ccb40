"""``fedbiopsy``: simulate, validate and run studies; each command group lives in its own module."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler

from cli.extract import extract as extract_command

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

app = typer.Typer(help="fedbiopsy: a federated virtual biopsy for MRI oncology.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
study_app = typer.Typer(help="Run federated studies.", no_args_is_help=True)
app.add_typer(study_app, name="study")
console = Console()


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)], force=True)
    if not verbose:
        for noisy in ("flwr", "ray", "numexpr", "radiomics", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.WARNING if noisy != "flwr" else logging.INFO)


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", help="Folder to write one sub-folder per simulated site into."),
    sites: int = typer.Option(3, min=1, help="Number of simulated hospitals."),
    patients: int = typer.Option(12, min=1, help="Patients per site."),
    size: int = typer.Option(64, min=16, help="Volume edge in voxels."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same sites."),
    unlabelled: int = typer.Option(0, min=0, help="Patients per site without a mask (truth kept in truth/)."),
) -> None:
    """Generate simulated hospitals (multi-site MRI phantoms with ground truth)."""
    from simulations.phantoms import simulate_sites

    paths = simulate_sites(out, sites=sites, patients=patients, size=size, seed=seed, progress=True,
                           unlabelled=unlabelled)
    console.print(f"[green]wrote {len(paths)} site(s)[/green] under {out}")


@app.command()
def validate(site_dir: Path = typer.Argument(..., help="A site directory (site.yaml, clinical.csv, images/, masks/).")
             ) -> None:
    """Check every case of a site; exit status 1 when any case or the site itself is invalid."""
    from common.validation import validate_site

    report = validate_site(site_dir)
    for p in report.site_problems:
        console.print(f"[red]SITE INVALID[/red] {p}", soft_wrap=True)
    for case in report.cases:
        for p in case.problems:
            console.print(f"[red]INVALID[/red] {case.patient_id}: {p}", soft_wrap=True)
        for w in case.warnings:
            console.print(f"[yellow]warning[/yellow] {case.patient_id}: {w}", soft_wrap=True)
    colour = "green" if report.valid else "red"
    console.print(f"[{colour}]{site_dir}: {len(report.cases)} case(s), {report.n_invalid} invalid"
                  f"{', site-level problems' if report.site_problems else ''}[/{colour}]", soft_wrap=True)
    raise typer.Exit(0 if report.valid else 1)


@study_app.command("run")
def study_run(
    config: Path = typer.Argument(None, help="Study YAML (default: the packaged demo study)."),
    sites_dir: Path = typer.Option(None, "--sites-dir", help="Folder of site directories; simulated when absent."),
    sites: int = typer.Option(None, "--sites", min=1, help="Number of simulated sites (overrides the config)."),
    out: Path = typer.Option(Path("results"), "--out", help="Where results go."),
) -> None:
    """Run a study in Flower's simulation engine over site directories."""
    from common.config import DEFAULT_STUDY, load_study_config
    from simulations.engine import run_simulated_study
    from simulations.phantoms import simulate_sites

    study_path = config or DEFAULT_STUDY
    study = load_study_config(study_path)
    if sites_dir is None:
        sim = study.simulation
        n = sites or sim.sites
        sites_dir = out / "sites"
        site_dirs = simulate_sites(sites_dir, sites=n, patients=sim.patients, size=sim.size, seed=sim.seed,
                                   progress=True, unlabelled=sim.unlabelled)
    else:
        site_dirs = sorted(p for p in sites_dir.iterdir() if (p / "site.yaml").is_file())
        if sites:
            site_dirs = site_dirs[:sites]
    summary = run_simulated_study(study, study_path, site_dirs, out / "study")
    _print_summary(summary, out)


def _print_summary(summary: dict, out: Path) -> None:
    fp = summary["outputs"].get("fingerprint")
    if fp:
        console.print(f"[bold]Fingerprint[/bold]: {fp['n_cases']} cases over {fp['n_sites']} sites "
                      f"{fp['cases_per_site']}")
        console.print(f"  target spacing (mm): {[round(s, 3) for s in fp['target_spacing']]}")
        for seq, stats in fp["intensity"].items():
            console.print(f"  {seq} foreground intensity: mean {stats['mean']:.1f}, sd {stats['std']:.1f}, "
                          f"p0.5-p99.5 {stats['percentiles']['p0.5']:.1f}-{stats['percentiles']['p99.5']:.1f}")
    reg = summary.get("registry")
    if reg:
        console.print(f"[bold]Registry[/bold]: {reg['location']} (run {reg['run_id']}, versions "
                      f"{', '.join(str(v) for v in reg.get('versions', [])) or 'none'}); "
                      f"try `fedbiopsy registry list --registry {reg['location']}`", soft_wrap=True)
    console.print(f"[green]Results:[/green] {(out / 'study').resolve()}")


app.command("extract")(extract_command)
app.command("compare-masks")(__import__("cli.segmentation", fromlist=["compare_masks"]).compare_masks)


app.add_typer(__import__("cli.registry", fromlist=["app"]).app, name="registry")  # fedbiopsy registry ...

app.command("preprocess")(__import__("cli.preprocess", fromlist=["preprocess"]).preprocess)
app.command("ingest")(__import__("cli.ingest", fromlist=["ingest"]).ingest)
app.command("harmonise")(__import__("cli.harmonise", fromlist=["harmonise"]).harmonise)

app.add_typer(__import__("cli.deploy", fromlist=["app"]).app, name="deploy")  # fedbiopsy deploy local|certs|...
app.add_typer(__import__("cli.experiment", fromlist=["app"]).app, name="experiment")  # fedbiopsy experiment harmonisation


def main() -> None:
    """Entry point of the console script."""
    app()


if __name__ == "__main__":
    main()
