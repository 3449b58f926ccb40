"""Run a study in Flower's simulation engine over site directories on this machine.

Each virtual SuperNode serves one site directory, exactly as a real SuperNode started with
``--node-config 'data-path="..."'``: a ClientApp mod sets ``data-path`` from the node's partition id,
and the same ClientApp/ServerApp handlers then run unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from flwr.app import Context, Message  # noqa: E402

from client.app import DATA_PATH_KEY, build_client_app  # noqa: E402
from common.config import StudyConfig  # noqa: E402
from server.app import build_server_app  # noqa: E402
from simulations.vce_polling import indexed_message_polling  # noqa: E402

log = logging.getLogger(__name__)


def site_path_mod(site_dirs: Sequence[Path]) -> Callable:
    """A ClientApp mod giving virtual node ``partition-id = i`` the ``data-path`` of ``site_dirs[i]``."""
    paths = [str(Path(p).resolve()) for p in site_dirs]

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        context.node_config[DATA_PATH_KEY] = paths[int(context.node_config["partition-id"])]
        return call_next(msg, context)

    return mod


def run_simulated_study(study: StudyConfig, study_path: Path, site_dirs: Sequence[Path], result_dir: Path,
                        cpus_per_site: float = 1.0, mods: Sequence[Callable] = ()) -> dict:
    """Run ``study`` over ``site_dirs`` in Flower's simulation engine; returns the study's outputs.

    ``mods``: extra ClientApp mods, run inside :func:`site_path_mod` (they see the node's ``data-path``).
    """
    from flwr.simulation import run_simulation

    result_dir = Path(result_dir).resolve()
    result_dir.mkdir(parents=True, exist_ok=True)
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    with warnings.catch_warnings(), indexed_message_polling():  # Flower's own pick-up costs nodes x messages
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=build_server_app(str(study_path), str(result_dir)),
            client_app=build_client_app(mods=[site_path_mod(site_dirs), *mods]),
            num_supernodes=len(site_dirs),
            backend_config=backend_config,  # type: ignore[arg-type]
        )
    out_file = result_dir / "study.json"
    if not out_file.is_file():
        raise RuntimeError(f"the simulated study wrote no {out_file}; see the Flower log above")
    return json.loads(out_file.read_text())
