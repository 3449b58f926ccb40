"""The coordinating centre's Flower ServerApp: a thin adapter from the run config to the study.

Run config (``pyproject.toml`` ``[tool.flwr.app.config]`` or ``flwr run --run-config``):
``study-config`` (path to the study YAML; empty: the packaged default), ``result-dir`` and ``site-nodes``
(``site-a:4711,site-b:4712``: each site's reply counts only from the node its key was registered as).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import load_study_config
from common.errors import ConfigError
from server.federation import Federation
from server.study import run_study


def _log_to_stderr() -> None:
    """In a ``flwr-serverapp`` process nothing configures logging: send INFO records to stderr, which the
    SuperLink streams to ``flwr run --stream`` / ``flwr log`` (no-op where logging is already set up)."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for package in ("fedbiopsy", "server", "client", "common"):
        logger = logging.getLogger(package)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


def _roster(text: str) -> dict[str, int]:
    """The run config's ``site-nodes``: ``site-a:4711,site-b:4712`` (site id : node id; '' for none)."""
    roster: dict[str, int] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        site, sep, node = entry.rpartition(":")
        if not sep or not site or not node.isdigit() or site in roster or int(node) in roster.values():
            raise ConfigError("--run-config site-nodes", "not a list of site-id:node-id pairs",
                              "pass e.g. site-nodes=\"hospital-a:4711,hospital-b:4712\" (ids: `flwr supernode list`)")
        roster[site] = int(node)
    return roster


def _simulated(grid: Grid) -> bool:
    """Whether the study runs in Flower's simulation engine (its virtual nodes have no keys to bind)."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def build_server_app(study_path: str | None = None, result_dir: str | None = None) -> ServerApp:
    """A ServerApp running the study; explicit arguments win over the run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_to_stderr()
        study = load_study_config(study_path or str(context.run_config.get("study-config", "")) or None)
        out = Path(result_dir or str(context.run_config.get("result-dir", "")) or "fedbiopsy-results")
        roster = _roster(str(context.run_config.get("site-nodes", "")))
        if not roster and not _simulated(grid):
            raise ConfigError("--run-config site-nodes", "no roster of the hospitals' node ids: a node could answer as "
                              "another site", "pass site-nodes=\"hospital-a:4711,...\" (ids: `flwr supernode list`)")
        run_study(Federation(grid, study, roster=roster), out)

    return server_app


app = build_server_app()
