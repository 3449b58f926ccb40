"""The layout that shows the architecture, checked on the source (AST) rather than trusted.

Layers point down only: ``common`` imports none of the others and no Flower; ``client`` and ``server``
import ``common`` and never each other; ``deploy``, ``simulations`` and ``cli`` sit on top. Flower is
imported only at the edges. No module is over 450 lines, and no in-process copy of a protocol's round loop
exists beside its driver in ``common/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations", "deploy", "cli")
MAY_IMPORT = {
    "common": set(),
    "client": {"common"},
    "server": {"common"},
    "deploy": {"common", "client", "server"},
    "simulations": {"common", "client", "server", "deploy"},
    "cli": {"common", "client", "server", "deploy", "simulations"},
}
FLOWER_EDGES = {
    "client/app.py", "server/app.py", "server/federation.py", "server/strategies.py", "simulations/engine.py",
    "simulations/vce_polling.py",
}
MAX_LINES = 450


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every absolute module an import statement of ``path`` names (relative imports resolved to the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = path.relative_to(root).parts[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, package if node.level else (node.module or "")))
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_scan_sees_every_package() -> None:
    counts = {pkg: sum(1 for p in _modules() if _rel(p).startswith(pkg + "/")) for pkg in PACKAGES}
    assert all(n > 0 for n in counts.values()), counts


def test_no_module_over_the_size_limit() -> None:
    big = {_rel(p): n for p in _modules() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_in_process_copies_of_round_loops() -> None:
    copies = sorted(_rel(p) for p in (ROOT / "simulations").glob("inprocess*.py"))
    assert not copies, f"in-process round loops beside the drivers in common/: {copies}"


def _round_loops(source: str) -> list[int]:
    """Lines of loops that call a query (``query(action, payload)``, ``query_sites(...)``): a protocol's rounds."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.For, ast.While)):
            calls = [c for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
            if any("query" in c.func.id for c in calls):  # type: ignore[union-attr]
                lines.append(node.lineno)
    return lines


def test_rounds_are_driven_only_by_the_drivers_in_common() -> None:
    loops = {_rel(p): found for p in _modules() if not _rel(p).startswith("common/")
             if (found := _round_loops(p.read_text(encoding="utf-8")))}
    assert not loops, f"round loops outside the protocol drivers of common/: {loops}"


def test_the_round_loop_check_finds_a_loop() -> None:
    source = "def run(ctx):\n    query = ctx.query()\n    for rnd in range(3):\n        query('kmeans_assign', {})\n"
    assert _round_loops(source) == [3]
    assert _round_loops("def run(ctx):\n    query = ctx.query()\n    query('fingerprint', {})\n") == []


def _violations(path: Path, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root).as_posix()
    package = rel.split("/")[0]
    wrong = []
    for line, module in _imports(path, root):
        top = module.split(".")[0]
        if top in PACKAGES and top != package and top not in MAY_IMPORT[package]:
            wrong.append(f"{rel}:{line} imports {module}")
        if top == "flwr" and rel not in FLOWER_EDGES and not rel.startswith("deploy/"):
            wrong.append(f"{rel}:{line} imports {module}")
    return wrong


@pytest.mark.parametrize("source, expected", [
    ("import numpy\nfrom client.steps import SITE_STEPS\n", ["server/x.py:2 imports client.steps"]),
    ("from flwr.app import Message\n", ["server/x.py:1 imports flwr.app"]),
    ("from common.protocol import Payload\n", []),
])
def test_the_scan_reports_a_violation_with_its_line(tmp_path: Path, source: str, expected: list[str]) -> None:
    """The scan itself can fail: a server module importing the hospital's code or Flower is reported."""
    fake = tmp_path / "server" / "x.py"
    fake.parent.mkdir()
    fake.write_text(source, encoding="utf-8")
    assert _violations(fake, tmp_path) == expected


def test_the_tree_has_no_violation() -> None:
    wrong = [v for path in _modules() for v in _violations(path)]
    assert not wrong, "\n".join(wrong)
