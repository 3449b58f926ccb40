"""``fedbiopsy deploy``: certificates and node keys, node registration, the app hash, and a local federation."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType

import typer
from rich.console import Console
from rich.text import Text

app = typer.Typer(help="Run studies on Flower's deployment engine (SuperLink + SuperNodes).", no_args_is_help=True)
console = Console()
log = logging.getLogger("fedbiopsy.deploy")
_CONFIG = typer.Option(None, "--config", help="Study YAML (default: the packaged demo study).")
_SITES_DIR = typer.Option(None, "--sites-dir", help="Folder of site directories; simulated when absent.")
_OUT = typer.Option(Path("results/deploy"), "--out", help="Where sites, keys, logs and results go.")
_PKI_OUT = typer.Option(..., "--out", help="Folder for ca.crt/key, superlink.crt/key and nodes/<site>.key/pub.")
_HOSTS = typer.Option([], "--host", help="SuperLink DNS name or IP for its certificate (repeatable).")
_KEY_OUT = typer.Option(..., "--out", help="Folder for <site>.key and <site>.pub (must not hold them yet).")
_KEYS = typer.Argument(..., help="Node public keys (nodes/<site>.pub).")
_FLWR_HOME = typer.Option(None, "--flwr-home", envvar="FLWR_HOME",
                          help="Folder holding the flwr CLI's config.toml (default ~/.flwr).")
_APP = typer.Option(None, "--app", help="Folder with fedbiopsy's pyproject.toml.")


def _interrupt_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so that every started process is stopped on the way out."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@app.command("local")
def local(
    sites: int = typer.Option(2, "--sites", min=1, help="Number of hospitals (SuperNodes)."),
    tls: bool = typer.Option(True, "--tls/--insecure",
                             help="TLS with a fresh study CA and SuperNode authentication (default), or neither."),
    config: Path = _CONFIG,
    sites_dir: Path = _SITES_DIR,
    out: Path = _OUT,
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds before the run is stopped."),
) -> None:
    """Start a real SuperLink and one SuperNode per site on 127.0.0.1, run the study with `flwr run`, stop all."""
    from common.config import DEFAULT_STUDY, load_study_config
    from deploy.local import LocalFederation
    from deploy.supervision import DeploymentError
    from simulations.phantoms import simulate_sites

    _interrupt_on_sigterm()
    study_path = (config or DEFAULT_STUDY).resolve()
    study = load_study_config(study_path)
    if sites_dir is None:
        sim = study.simulation
        site_dirs = simulate_sites(out / "sites", sites=sites, patients=sim.patients, size=sim.size, seed=sim.seed,
                                   progress=True, unlabelled=sim.unlabelled, raters=sim.raters,
                                   rated_fraction=sim.rated_fraction)
    else:
        site_dirs = sorted(p for p in sites_dir.iterdir() if (p / "site.yaml").is_file())[:sites]
        if len(site_dirs) < sites:
            raise typer.BadParameter(f"{sites_dir} holds {len(site_dirs)} site(s) with a site.yaml, {sites} asked",
                                     param_hint="--sites-dir")
    if len(site_dirs) < study.min_sites:
        console.print(f"[yellow]warning:[/yellow] {len(site_dirs)} site(s) but the study needs {study.min_sites}")
    # simulated sites approve this checkout's app; a real site must have approved it in its site.yaml
    fed = LocalFederation(site_dirs, out / "work", tls=tls, approve_app=sites_dir is None)
    try:
        with fed:
            console.print(f"[green]SuperLink[/green] {fed.address} "
                          f"({'TLS + node authentication' if tls else '[red]INSECURE[/red]'}); "
                          f"{len(fed.nodes)} SuperNode(s); logs in {fed.processes.log_dir}")
            outcome = fed.run_study(study_path, out / "study", timeout_s=timeout,
                                    on_line=lambda line: console.print(Text.from_ansi(line), highlight=False))
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: stopped every process started ({fed.processes.log_dir})")
        raise typer.Exit(130) from None
    except DeploymentError as err:
        console.print(f"[red]deployment failed[/red]: {err}")
        raise typer.Exit(1) from None
    if not outcome.completed:
        console.print(f"[red]run {outcome.run_id} did not complete[/red] ({outcome.status}); the ServerApp log is "
                      f"above, node logs in {fed.processes.log_dir}")
        raise typer.Exit(1)
    summary = outcome.summary()
    console.print(f"[green]run {outcome.run_id} completed[/green] in {outcome.seconds:.1f}s: phases "
                  f"{summary['phases']}, participants {summary['participants']}; results in {outcome.result_dir}")


@app.command("certs")
def certs(
    out: Path = _PKI_OUT,
    sites: str = typer.Option("", "--sites", help="Comma-separated hospital names, one key pair each."),
    host: list[str] = _HOSTS,
    study: str = typer.Option("fedbiopsy", "--study", help="Organisation name in the CA certificate."),
    reuse_ca: bool = typer.Option(False, "--reuse-ca", help="Keep the CA (ca.crt in --out, ca.key in "
                                  "<out>-ca-offline); renew the SuperLink certificate."),
) -> None:
    """Create a study CA, the SuperLink's TLS certificate and one EC P-384 key pair per hospital."""
    from deploy.certificates import create_study_pki

    pki = create_study_pki(out, [s for s in sites.split(",") if s], host, study, reuse_ca=reuse_ca)
    console.print(f"CA {pki.ca_cert} (keep {pki.ca_key} offline), SuperLink {pki.server_cert}; node keys: "
                  + ", ".join(f"{k.site} -> {k.private_key.name} (to the hospital) / {k.public_key.name} (register)"
                              for k in pki.nodes.values()))


@app.command("node-key")
def node_key(
    out: Path = _KEY_OUT,
    site: str = typer.Option(..., "--site", help="This hospital's name."),
) -> None:
    """At a hospital: create this SuperNode's EC P-384 key pair; send only the .pub to the coordinating centre."""
    from deploy.certificates import create_node_keys

    keys = create_node_keys(out, site)
    console.print(f"private key {keys.private_key} (stays here, mode 600); public key {keys.public_key} (send it)")


@app.command("register")
def register(
    public_keys: list[Path] = _KEYS,
    superlink: str = typer.Option(None, "--superlink", help="SuperLink connection in $FLWR_HOME/config.toml."),
    flwr_home: Path = _FLWR_HOME,
) -> None:
    """Register hospital SuperNodes' public keys at the SuperLink (`flwr supernode register`)."""
    from deploy.certificates import register_node

    for key in public_keys:
        node_id = register_node(key, superlink, flwr_home or Path.home() / ".flwr", name=key.stem)
        console.print(f"{key.stem}: node {node_id}")


@app.command("app-hash")
def app_hash(app_dir: Path = _APP) -> None:
    """Print the hash of the app `flwr run` submits, for `policy.approved_apps` in each site.yaml."""
    import tempfile

    from deploy.app import REPO_ROOT, stage_app
    from deploy.app import app_hash as compute

    with tempfile.TemporaryDirectory() as tmp:
        console.print(compute(stage_app(Path(tmp) / "app", app_dir or REPO_ROOT)))
