"""Export a version for an auditor: its artifact, model card (Markdown + JSON), lineage, audit events, checksums."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from common.hashing import sha256_file
from server.registry.card import card_markdown, model_card
from server.registry.errors import RegistryError

if TYPE_CHECKING:
    from server.registry.registry import Registry

MANIFEST = "SHA256SUMS"


def export_version(registry: Registry, ref: str | int, dest: Path | str, overwrite: bool = False) -> list[Path]:
    """Write the version's bundle into ``dest``; returns the files written (checksums last).

    The artifact is checked against its hash first, so a damaged artifact exports nothing.
    """
    v = registry.version(ref)
    data = registry.artifact_bytes(v.id)
    card = model_card(registry, v.id)
    lineage = registry.lineage(v.id)
    subjects = {f"version:{x.id}" for x in lineage} | {f"run:{x.run_id}" for x in lineage}
    events = [asdict(e) for e in registry.events() if e.subject in subjects]
    dest = Path(dest)
    names = {"artifact": f"{v.label}-{v.artifact_name}", "md": "model_card.md", "json": "model_card.json",
             "lineage": "lineage.json", "audit": "audit_events.json"}
    clash = [n for n in [*names.values(), MANIFEST] if (dest / n).exists()]
    if clash and not overwrite:
        raise RegistryError(f"{dest} already holds {clash}. Fix: export into an empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / names["artifact"]).write_bytes(data)
    (dest / names["md"]).write_text(card_markdown(card), encoding="utf-8")
    (dest / names["json"]).write_text(json.dumps(card, indent=2), encoding="utf-8")
    (dest / names["lineage"]).write_text(json.dumps([asdict(x) | {"label": x.label} for x in lineage], indent=2),
                                         encoding="utf-8")
    seq, head = registry.head()
    (dest / names["audit"]).write_text(json.dumps({"head": {"seq": seq, "hash": head}, "events": events}, indent=2),
                                       encoding="utf-8")
    written = [dest / n for n in names.values()]
    (dest / MANIFEST).write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in written), encoding="utf-8")
    return [*written, dest / MANIFEST]
