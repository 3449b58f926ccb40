"""Loading a site once per node process, not once per message.

Validating a cohort reads every image; a multi-round phase would otherwise repeat that for every message.
The cache is keyed on the site folder and invalidated by any change of size or modification time of
``site.yaml``, ``clinical.csv`` or a file under ``images/`` and ``masks/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.sitedata import Site
from common.validation import load_site

_CACHE: dict[Path, tuple[tuple, Site]] = {}


def _signature(root: Path) -> tuple:
    entries = []
    for name in ("site.yaml", "clinical.csv"):
        p = root / name
        if p.exists():
            st = p.stat()
            entries.append((name, st.st_mtime_ns, st.st_size))
    for sub in ("images", "masks"):
        for dirpath, _, files in os.walk(root / sub):
            for f in files:
                st = os.stat(os.path.join(dirpath, f))
                entries.append((os.path.join(dirpath, f), st.st_mtime_ns, st.st_size))
    return tuple(sorted(entries))


def load_site_cached(site_dir: Path | str) -> Site:
    """:func:`common.validation.load_site`, reused while the site's files are unchanged."""
    root = Path(site_dir).resolve()
    signature = _signature(root)
    hit = _CACHE.get(root)
    if hit is not None and hit[0] == signature:
        return hit[1]
    site = load_site(root)
    _CACHE[root] = (signature, site)
    return site
