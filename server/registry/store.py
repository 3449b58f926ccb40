"""The content-addressed artifact store: ``<folder>/artifacts/<sha[:2]>/<sha256>``, one file per distinct content.

Files are written to a temporary name, hashed while copied, synced and renamed, so a crash never leaves a
partial file under a content name; storing content whose file is damaged rewrites it (nothing is lost).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.hashing import sha256_file
from server.registry.errors import ArtifactError, RegistryError

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Stored:
    """An artifact once stored: its hash, its size in bytes and its path in the store."""

    sha256: str
    size: int
    path: Path


def _copy_hashing(src: Path, dst_dir: Path) -> tuple[Path, str, int]:
    h = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=dst_dir)
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            while block := fin.read(_CHUNK):
                h.update(block)
                size += len(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), h.hexdigest(), size


class ArtifactStore:
    """Files by the sha256 of their bytes, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_of(self, sha256: str) -> Path:
        """Where the content ``sha256`` is (or would be) stored."""
        return self.root / sha256[:2] / sha256

    def relative(self, sha256: str) -> str:
        """The stored path relative to the registry folder, for messages."""
        return f"{self.root.name}/{sha256[:2]}/{sha256}"

    def put(self, src: Path | str) -> Stored:
        """Store a copy of the file ``src``; returns its hash. Idempotent; heals a damaged stored copy."""
        src = Path(src)
        if not src.is_file():
            raise RegistryError(f"artifact file {src} does not exist. Fix: write the file before listing it "
                                "under the phase's 'artifacts'")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp, sha, size = _copy_hashing(src, self.root)
        dst = self.path_of(sha)
        try:
            if dst.is_file() and dst.stat().st_size == size and sha256_file(dst) == sha:
                tmp.unlink()
            else:
                if dst.exists():
                    log.warning("artifact store: %s was damaged; rewritten from %s", self.relative(sha), src)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return Stored(sha, size, dst)

    def check(self, sha256: str, size: int) -> str | None:
        """What is wrong with the stored content ``sha256`` of ``size`` bytes (None: intact)."""
        path = self.path_of(sha256)
        if not path.is_file():
            return f"file {self.relative(sha256)} is missing"
        actual = path.stat().st_size
        if actual < size:
            return f"file {self.relative(sha256)} is truncated: {actual} of {size} bytes"
        now = sha256_file(path)
        if actual != size or now != sha256:
            return f"file {self.relative(sha256)} has changed: {actual} bytes with sha256 {now[:16]}..."
        return None

    def read(self, sha256: str, size: int) -> bytes:
        """The bytes of ``sha256``, checked against the hash; raises :class:`ArtifactError` when damaged."""
        problem = self.check(sha256, size)
        if problem:
            raise ArtifactError(f"artifact {sha256[:16]}...: {problem}. Fix: restore the registry folder from a copy, "
                                "or register the original file again (the store rewrites damaged content)")
        return self.path_of(sha256).read_bytes()
