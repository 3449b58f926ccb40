"""``fedbiopsy registry ...``: list, show, lineage, touched-by, verify, card and export model versions.

Exit status: 0 on success; 1 when ``verify`` finds a broken link; 2 on bad input (no registry there,
unknown version, damaged artifact, newer schema).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from server.registry import Registry, Version

app = typer.Typer(help="Query and verify the model registry (lineage, audit trail, model cards).",
                  no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)
REGISTRY_OPTION = typer.Option("registry", "--registry", "-r",
                               help="Registry folder, or a SQLAlchemy database URL (default: ./registry).")
URL_OPTION = typer.Option(None, "--url", help="Database URL when --registry is the artifact folder (e.g. PostgreSQL).")
_CARD_OUT = typer.Option(None, "--out", help="Write model_card.md and model_card.json into this folder.")
_EXPORT_DEST = typer.Argument(..., help="Folder to write the bundle into (must not hold an export).")


@contextmanager
def _open(where: str, url: str | None) -> Iterator[Registry]:
    """The registry, opened for the command; any fedbiopsy error inside the block exits 2 with its message."""
    from common.errors import FedBiopsyError
    from server.registry import open_registry

    try:
        with open_registry(where, url=url, create=False) as reg:
            yield reg
    except FedBiopsyError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _sites(v: Version) -> str:
    return ", ".join(f"{s.site_id}({s.n_cases})" for s in v.sites) or "—"


@app.command("list")
def list_versions(registry: str = REGISTRY_OPTION, url: str = URL_OPTION,
                  kind: str = typer.Option(None, "--kind", help="Only versions of this kind."),
                  site: str = typer.Option(None, "--site", help="Only versions this site contributed to directly.")
                  ) -> None:
    """Every model version, oldest first."""
    with _open(registry, url) as reg:
        versions = reg.versions(kind=kind, site=site)
        table = Table(title=f"{reg.location.describe()}: {len(versions)} version(s)")
        for col in ("version", "kind", "round", "study", "run", "phase", "parent", "sites (cases)", "artifact"):
            table.add_column(col, overflow="fold")
        for v in versions:
            table.add_row(v.label, v.kind, "" if v.round is None else str(v.round), v.study_name, str(v.run_id),
                          v.phase, f"v{v.parent_id}" if v.parent_id else "", _sites(v), v.artifact_sha256[:12])
        console.print(table)


@app.command()
def show(version: str = typer.Argument(..., help="v<id>, <id> or an artifact sha256 prefix."),
         registry: str = REGISTRY_OPTION, url: str = URL_OPTION,
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """One version's full record."""
    from dataclasses import asdict

    with _open(registry, url) as reg:
        v = reg.version(version)
        record = asdict(v) | {"label": v.label}
        if as_json:
            console.print_json(json.dumps(record))
            return
        console.print(f"[bold]{v.label}[/bold] {v.kind}" + (f" round {v.round}" if v.round is not None else ""))
        for key in ("study_name", "study_hash", "run_id", "phase", "code_version", "git_commit", "parent_id",
                    "plan_id", "harmonisation_id", "artifact_name", "artifact_sha256", "artifact_size",
                    "settings_hash", "preprocessing_hash", "delta", "created_at"):
            console.print(f"  {key}: {record[key]}")
        for s in v.sites:
            console.print(f"  site {s.site_id}: {s.n_cases} case(s), manifest {s.manifest_hash} "
                          f"({s.manifest_cases} case(s)), epsilon {v.epsilon.get(s.site_id, '—')}")
        for k, m in v.metrics.items():
            console.print(f"  metrics {k}: {m}")
        if v.extra:
            console.print(f"  extra: {v.extra}")


@app.command()
def lineage(version: str = typer.Argument(..., help="v<id>, <id> or an artifact sha256 prefix."),
            registry: str = REGISTRY_OPTION, url: str = URL_OPTION) -> None:
    """The version and every version it derives from, with their sites and data fingerprints."""
    with _open(registry, url) as reg:
        chain = reg.lineage(version)
        table = Table(title=f"lineage of {chain[0].label}")
        for col in ("version", "kind", "round", "run", "phase", "parent", "site", "cases", "manifest sha256"):
            table.add_column(col, overflow="fold")
        for v in chain:
            for i, s in enumerate(v.sites or [None]):
                head = [v.label, v.kind, "" if v.round is None else str(v.round), str(v.run_id), v.phase,
                        f"v{v.parent_id}" if v.parent_id else ""] if i == 0 else [""] * 6
                table.add_row(*head, *(["—", "", ""] if s is None else
                                       [s.site_id, str(s.n_cases), (s.manifest_hash or "unknown")[:16]]))
        console.print(table)
        sites = sorted({s.site_id for v in chain for s in v.sites})
        console.print(f"sites in the lineage: {', '.join(sites) or 'none'}")


@app.command("touched-by")
def touched_by(site: str = typer.Argument(..., help="A site id."), registry: str = REGISTRY_OPTION,
               url: str = URL_OPTION) -> None:
    """Every version the site's data contributed to, directly or through an ancestor (for withdrawals)."""
    with _open(registry, url) as reg:
        touches = reg.touched_by(site)
        table = Table(title=f"{len(touches)} version(s) touched by {site}")
        for col in ("version", "kind", "round", "study", "run", "how"):
            table.add_column(col)
        for t in touches:
            v = t.version
            how = "direct" if t.direct else "via " + ", ".join(f"v{i}" for i in t.via)
            table.add_row(v.label, v.kind, "" if v.round is None else str(v.round), v.study_name, str(v.run_id), how)
        console.print(table)


@app.command()
def verify(registry: str = REGISTRY_OPTION, url: str = URL_OPTION,
           head: str = typer.Option(None, "--head", help="An audit head published earlier (<seq>:<sha256>, as "
                                    "in study.json registry.head / registry-head.txt, or a bare sha256); must be in "
                                    "the log.")
           ) -> None:
    """Recompute the audit chain and every artifact hash; exit 1 naming the first broken link."""
    from server.registry.verify import format_head

    with _open(registry, url) as reg:
        report = reg.verify(expected_head=head)
    if report.ok:
        console.print(f"[green]ok[/green]: {report.n_events} audit event(s), {report.n_versions} version(s), "
                      f"{report.n_artifacts} artifact(s) verified; head {format_head(report.head)}")
        return
    err_console.print(f"[red]BROKEN[/red]: {report.first}")
    if len(report.broken) > 1:
        err_console.print(f"  and {len(report.broken) - 1} more:")
        for b in report.broken[1:]:
            err_console.print(f"  - {b}")
    raise typer.Exit(1)


@app.command()
def card(version: str = typer.Argument(..., help="v<id>, <id> or an artifact sha256 prefix."),
         registry: str = REGISTRY_OPTION, url: str = URL_OPTION,
         as_json: bool = typer.Option(False, "--json", help="Print the JSON card instead of Markdown."),
         out: Path = _CARD_OUT) -> None:
    """The version's FUTURE-AI model card (Markdown, or JSON)."""
    from server.registry import card_markdown, model_card

    with _open(registry, url) as reg:
        c = model_card(reg, version)
    text = json.dumps(c, indent=2) if as_json else card_markdown(c)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model_card.md").write_text(card_markdown(c), encoding="utf-8")
        (out / "model_card.json").write_text(json.dumps(c, indent=2), encoding="utf-8")
        console.print(f"[green]wrote[/green] {out / 'model_card.md'} and {out / 'model_card.json'}")
    else:
        typer.echo(text)


@app.command()
def export(version: str = typer.Argument(..., help="v<id>, <id> or an artifact sha256 prefix."),
           dest: Path = _EXPORT_DEST,
           registry: str = REGISTRY_OPTION, url: str = URL_OPTION) -> None:
    """Write the version's artifact, model card, lineage, audit events and checksums into DEST."""
    from server.registry import export_version

    with _open(registry, url) as reg:
        files = export_version(reg, version, dest)
    for f in files:
        console.print(f"  {f}")
    console.print(f"[green]exported[/green] {version} to {dest}")
