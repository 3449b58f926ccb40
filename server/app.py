"""The coordinating centre's Flower ServerApp: a thin adapter from the run config to the study.

Run config (``pyproject.toml`` ``[tool.flwr.app.config]`` or ``flwr run --run-config``):
``study-config`` (path to the study YAML; empty: the packaged default) and ``result-dir``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import load_study_config
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


def build_server_app(study_path: str | None = None, result_dir: str | None = None) -> ServerApp:
    """A ServerApp running the study; explicit arguments win over the run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_to_stderr()
        study = load_study_config(study_path or str(context.run_config.get("study-config", "")) or None)
        out = Path(result_dir or str(context.run_config.get("result-dir", "")) or "fedbiopsy-results")
        run_study(Federation(grid, study), out)

    return server_app


app = build_server_app()
