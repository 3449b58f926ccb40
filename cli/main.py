"""``fedbiopsy``: simulate, validate and run studies; each command group lives in its own module."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler

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
    four_d: list[str] = typer.Option([], "--4d", help="Also write this 4D series (DWI: multi-b diffusion, DCE: "
                                     "dynamic contrast) with its truth maps; repeat for both."),
) -> None:
    """Generate simulated hospitals (multi-site MRI phantoms with ground truth)."""
    from simulations.phantoms import simulate_sites

    paths = simulate_sites(out, sites=sites, patients=patients, size=size, seed=seed, progress=True,
                           unlabelled=unlabelled, sequences=("T2w", "CET1", *four_d))
    console.print(f"[green]wrote {len(paths)} site(s)[/green] under {out}")


@app.command()
def validate(site_dir: Path = typer.Argument(..., help="A site directory (site.yaml, clinical.csv, images/, masks/; "
                                             "a tabular site: site.yaml and clinical.csv)."),
             study: Path = typer.Option(None, "--study", help="Also check the columns this study's prognosis "
                                        "section names (types, missing values, the site's policy).")) -> None:
    """Check every case of a site; exit status 1 when any case or the site itself is invalid."""
    from common.validation import validate_site, validate_study_columns

    report = validate_site(site_dir)
    for p in report.site_problems:
        console.print(f"[red]SITE INVALID[/red] {p}", soft_wrap=True)
    for case in report.cases:
        for p in case.problems:
            console.print(f"[red]INVALID[/red] {case.patient_id}: {p}", soft_wrap=True)
        for w in case.warnings:
            console.print(f"[yellow]warning[/yellow] {case.patient_id}: {w}", soft_wrap=True)
    column_problems: list = []
    if study is not None:
        from common.config import load_study_config

        column_problems, column_warnings = validate_study_columns(site_dir, load_study_config(study))
        for p in column_problems:
            console.print(f"[red]COLUMN INVALID[/red] {p}", soft_wrap=True)
        for w in column_warnings:
            console.print(f"[yellow]warning[/yellow] {w}", soft_wrap=True)
    valid = report.valid and not column_problems
    colour = "green" if valid else "red"
    console.print(f"[{colour}]{site_dir}: {len(report.cases)} case(s), {report.n_invalid} invalid"
                  f"{', site-level problems' if report.site_problems else ''}"
                  f"{f', {len(column_problems)} column problem(s)' if column_problems else ''}[/{colour}]",
                  soft_wrap=True)
    raise typer.Exit(0 if valid else 1)


@app.command()
def maps(site_dir: Path = typer.Argument(..., help="A site directory whose site.yaml lists DWI and/or DCE."),
         study: Path = typer.Option(None, "--study", help="Study YAML whose maps section to use (default: the "
                                    "packaged study over the site's sequences).")) -> None:
    """Fit the parametric maps of a site's 4D series into derived/maps/ (ADC, IVIM; Ktrans, ve, vp, curve
    features); a case whose series is unusable is listed with its reason and the others go on."""
    from client.maps import compute_site_maps, maps_dir
    from common.config import load_study_config
    from common.validation import load_site

    site = load_site(site_dir)
    cfg = load_study_config(study) if study else load_study_config(
        None, sequences=list(site.config.sequences), reference_sequence=site.config.reference_sequence)
    if not cfg.four_d:
        console.print(f"[yellow]{site_dir}: the study lists no 4D sequence (DWI, DCE); nothing to fit[/yellow]")
        raise typer.Exit(1)
    results = compute_site_maps(site, cfg, progress=True)
    for r in results:
        if r.problem:
            console.print(f"[red]NO MAPS[/red] {r.patient_id}: {r.problem}", soft_wrap=True)
    ok = sum(r.problem is None for r in results)
    colour = "green" if ok == len(results) else "yellow"
    console.print(f"[{colour}]{ok} of {len(results)} case(s) mapped "
                  f"({', '.join(n for s in cfg.four_d for n in cfg.maps.of(s))}) under {maps_dir(site.root)}"
                  f"[/{colour}]", soft_wrap=True)
    raise typer.Exit(0 if ok else 1)


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
                                   progress=True, unlabelled=sim.unlabelled, raters=sim.raters,
                                   rated_fraction=sim.rated_fraction, sequences=("T2w", "CET1", *study.four_d))
    else:
        site_dirs = sorted(p for p in sites_dir.iterdir() if (p / "site.yaml").is_file())
        if sites:
            site_dirs = site_dirs[:sites]
    summary = run_simulated_study(study, study_path, site_dirs, out / "study")
    _print_summary(summary, out)


def _print_summary(summary: dict, out: Path) -> None:
    outputs = summary["outputs"]
    fp = outputs.get("fingerprint")
    if fp:
        console.print(f"[bold]Cohort[/bold]: {fp['n_cases']} cases with masks over {fp['n_sites']} sites "
                      f"{fp['cases_per_site']}; target spacing {[round(s, 3) for s in fp['target_spacing']]} mm")
    pre = (outputs.get("preprocessing") or {}).get("effect")
    if pre:
        console.print("[bold]Preprocessing[/bold]: across-site spread of the median intensity shrank "
                      + ", ".join(f"{seq} {v['shrink']:.1f}x" for seq, v in pre["spread"].items()))
    seg = outputs.get("segmentation")
    if seg and seg.get("rounds"):
        per_site = {s: round(v["dsc"]["median"], 3) for s, v in seg["rounds"][-1]["sites"].items()
                    if isinstance(v, dict) and isinstance(v.get("dsc"), dict)}
        console.print(f"[bold]Segmentation[/bold]: median held-out DSC {seg['initial_dsc_median']:.3f} -> "
                      f"{seg['final_dsc_median']:.3f}; per site {per_site}")
    if outputs.get("harmonisation"):
        h = outputs["harmonisation"]
        console.print(f"[bold]Harmonisation[/bold]: federated ComBat over {h['n_features']} features, "
                      f"{h['n_cases']} cases, batches {h['batches']}")
    red = outputs.get("reduction")
    if red:
        console.print(f"[bold]Signature[/bold]: {len(red['kept'])} features kept, "
                      f"{len(red['explained_variance'])} factors")
    rg = outputs.get("radiogenomics")
    if rg:
        console.print(f"[bold]Radiogenomics[/bold]: {len(rg['associated'])} signature feature(s) associated with "
                      f"{rg['column']} at q < {rg['fdr']:g}: {rg['associated']}")
    for row in (outputs.get("classifier") or {}).get("comparison", []):
        console.print(f"[bold]Classifier {row['model']}[/bold]: pooled AUC {row['auc']:.3f}, accuracy "
                      f"{row['accuracy']:.3f}, Brier {row['brier']:.3f} (AUC and accuracy from the sites' score "
                      "cells of at least min_cell held-out cases; the Brier score is exact)")
    oc = outputs.get("outcomes")
    if oc:
        sizes = {g: v.get("n") for g, v in (oc.get("groups") or {}).items()}
        console.print(f"[bold]Outcomes[/bold]: clusters {sizes}; log-rank p = {oc['logrank']['p_value']:.4g} "
                      f"(times {oc['mode']})")
    reg = summary.get("registry")
    if reg:
        console.print(f"[bold]Registry[/bold]: {reg['location']} (run {reg['run_id']}, versions "
                      f"{', '.join(str(v) for v in reg.get('versions', [])) or 'none'}); "
                      f"try `fedbiopsy registry list --registry {reg['location']}`", soft_wrap=True)
    report = (outputs.get("report") or {}).get("report")
    if report:
        console.print(f"[green]Report:[/green] {report}", soft_wrap=True)
    console.print(f"[green]Results:[/green] {(out / 'study').resolve()}", soft_wrap=True)


# Command groups and commands living in their own modules (each imports its heavy dependencies when run).
from cli import deploy, experiment, harmonise, ingest, preprocess, registry, segmentation  # noqa: E402
from cli.extract import extract as extract_command  # noqa: E402

app.command("extract")(extract_command)
app.command("preprocess")(preprocess.preprocess)
app.command("ingest")(ingest.ingest)
app.command("harmonise")(harmonise.harmonise)
app.command("compare-masks")(segmentation.compare_masks)
app.command("segmentation-study")(segmentation.segmentation_study)
app.add_typer(registry.app, name="registry")
app.add_typer(deploy.app, name="deploy")
app.add_typer(experiment.app, name="experiment")


def main() -> None:
    """Entry point of the console script."""
    app()


if __name__ == "__main__":
    main()
