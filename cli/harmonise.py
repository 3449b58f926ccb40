"""``fedbiopsy harmonise``: harmonise a site's features with a stored federated ComBat model, at the site.

New cases of a site (batch) the model knows are transformed with its estimates; a site that joins later is
first estimated from its own patients. Nothing leaves the site.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def harmonise(
    site_dir: Annotated[Path, typer.Argument(help="A site directory (site.yaml, clinical.csv, derived/features.csv).")],
    model: Annotated[Path, typer.Option("--model", help="combat_model.npz of a harmonisation phase.")],
    features: Annotated[str, typer.Option("--features", help="Feature table under derived/.")] = "features.csv",
    out: Annotated[str, typer.Option("--out", help="Table to write under derived/.")] = "features_harmonised.csv",
    save_model: Annotated[Path | None, typer.Option("--save-model",
                                                    help="Write the model extended with new batches here.")] = None,
) -> None:
    """Harmonise a site's feature table with a stored ComBat model."""
    from client.steps.harmonisation import harmonise_with_model
    from common.combat_model import CombatModel
    from common.validation import load_site

    table, extended, new = harmonise_with_model(load_site(site_dir), CombatModel.load(model), features, out)
    if new:
        console.print(f"new batch(es) {list(new)} estimated from this site's {len(table)} case(s)")
    if save_model is not None:
        extended.save(save_model)
        console.print(f"extended model -> {save_model}")
    console.print(f"[green]{len(table)} case(s) x {table.shape[1]} feature(s)[/green] -> {site_dir / 'derived' / out}")
