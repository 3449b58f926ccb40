"""Real MRI for parity tests: pyradiomics 3.0.1's source distribution, which ships ``data/brain1_image.nrrd``,
``data/brain1_label.nrrd`` and the baseline feature values ``data/baseline/baseline_<class>.csv``.

:func:`pyradiomics_data` downloads the archive once with pip (from PyPI; ``--no-build-isolation`` so that pip's
metadata step runs in this environment, where numpy is installed), keeps only those files under the cache folder
(default ``<repo>/.cache/pyradiomics-3.0.1/``, git-ignored) and reuses them afterwards. When the archive cannot be
had (offline, no pip), it returns ``None`` with the reason, so that tests can skip saying why.

``python -m simulations.realdata`` fetches it (the Makefile runs this before the tests); it always exits 0.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = "3.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache" / f"pyradiomics-{VERSION}"
CASES: tuple[str, ...] = ("brain1",)
BASELINE_CLASSES: tuple[str, ...] = ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")


def _wanted(data_dir: Path) -> list[Path]:
    files = [data_dir / f"{case}_{kind}.nrrd" for case in CASES for kind in ("image", "label")]
    return files + [data_dir / "baseline" / f"baseline_{cls}.csv" for cls in BASELINE_CLASSES]


def _complete(data_dir: Path) -> bool:
    return all(p.is_file() and p.stat().st_size > 0 for p in _wanted(data_dir))


def _keep(name: str) -> str | None:
    """The path under ``data/`` to keep for an archive member, or None."""
    parts = Path(name).parts
    if len(parts) < 3 or parts[1] != "data" or ".." in parts:
        return None
    rel = Path(*parts[2:])
    if rel.suffix == ".nrrd" and rel.parent == Path(".") and rel.name.split("_")[0] in CASES:
        return rel.as_posix()
    if rel.parent == Path("baseline") and rel.name.startswith("baseline_") and rel.suffix == ".csv":
        return rel.as_posix()
    return None


def _download(dest: Path, timeout_s: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", f"pyradiomics=={VERSION}", "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    archives = sorted(dest.glob(f"pyradiomics-{VERSION}.tar.gz"))
    if done.returncode != 0 or not archives:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pip download failed (exit {done.returncode}): {' | '.join(tail) or 'no output'}")
    return archives[0]


def pyradiomics_data(cache_dir: Path | str | None = None, timeout_s: float = 600.0) -> tuple[Path | None, str]:
    """``(data folder, "")`` holding brain1 and the baselines, or ``(None, reason)`` when they cannot be had."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    data_dir = cache / "data"
    if _complete(data_dir):
        return data_dir, ""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.parent, prefix=".pyradiomics-") as tmp:
            archive = _download(Path(tmp) / "dl", timeout_s)
            staged = Path(tmp) / "data"
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():
                    rel = _keep(member.name)
                    if rel is None or not member.isfile():
                        continue
                    target = staged / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    if source is None:
                        continue
                    with source, open(target, "wb") as fh:
                        shutil.copyfileobj(source, fh)
            if not _complete(staged):
                missing = [p.name for p in _wanted(staged) if not p.is_file()]
                return None, f"pyradiomics-{VERSION} archive lacks {missing}"
            if data_dir.exists():
                shutil.rmtree(data_dir)
            data_dir.parent.mkdir(parents=True, exist_ok=True)
            staged.rename(data_dir)
    except (OSError, RuntimeError, subprocess.TimeoutExpired, tarfile.TarError) as exc:
        return None, f"cannot get the pyradiomics {VERSION} source distribution from PyPI: {exc}"
    log.info("pyradiomics %s test data in %s", VERSION, data_dir)
    return data_dir, ""


def main() -> int:
    """Fetch the data; print where it is, or why not. Always 0: the tests report a missing archive themselves."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data_dir, reason = pyradiomics_data()
    log.info("pyradiomics %s data: %s", VERSION, data_dir if data_dir else f"unavailable ({reason})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
