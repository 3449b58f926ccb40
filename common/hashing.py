"""Provenance hashing: canonical JSON, files and directories."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} canonically")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no white space, so equal content hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default, allow_nan=False)


def sha256_text(text: str) -> str:
    """Hex sha256 of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of the canonical JSON of ``obj``."""
    return sha256_text(canonical_json(obj))


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=8192)
def _sha256_at(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def sha256_file_cached(path: Path | str) -> str:
    """:func:`sha256_file`, computed once per (path, modification time, size): for checks every federated message
    repeats over the same images."""
    st = Path(path).stat()
    return _sha256_at(str(path), st.st_mtime_ns, st.st_size)


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (study seed, site id, round...), the same on every machine."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF
