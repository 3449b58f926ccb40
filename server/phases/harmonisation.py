"""Server half of the harmonisation phase: federated ComBat, and the fitted model stored for the registry.

The rounds are :func:`common.harmonisation.run_harmonisation`'s, over ``ctx.query()`` (a fixed cohort); the
sites harmonise their own tables. The global model (``harmonisation/combat_model.npz``: beta, grand mean,
pooled variance, every batch's estimates and the design spec) lets new cases of a known site, and a site
joining later, be harmonised the same way.
"""

from __future__ import annotations

import time

import numpy as np

from common.harmonisation import options_from_config, run_harmonisation
from common.hashing import sha256_file, sha256_json
from server.phases.base import PhaseContext

MODEL_FILE = "combat_model.npz"


def run(ctx: PhaseContext) -> dict:
    """Run federated ComBat over the connected sites; returns the summary and the harmonisation artifact."""
    cfg = ctx.study.harmonisation
    query = ctx.query()
    start = time.perf_counter()
    result = run_harmonisation(query, options_from_config(cfg))
    wall_s = time.perf_counter() - start
    model, spec = result.model, result.model.spec
    path = model.save(ctx.result_dir / "harmonisation" / MODEL_FILE)
    ctx.participants["harmonisation"] = dict(result.cases)
    est = model.estimates
    pooled = {
        "n_cases": float(spec.n_cases), "n_features": float(spec.n_features), "n_batches": float(spec.n_batch),
        # the batch effects removed, in units of the pooled residual sd
        "mean_abs_gamma_hat": float(np.mean(np.abs(est.gamma_hat))),
        "mean_abs_log_delta_hat": float(np.mean(np.abs(np.log(est.delta_hat)))),
    }
    metrics: dict[str, dict[str, float]] = {"pooled": pooled}
    metrics.update({site: {"n_cases": float(n)} for site, n in result.cases.items()})
    return {
        "model": str(path),
        "model_sha256": sha256_file(path),
        "options": options_from_config(cfg).to_dict(),
        "n_sites": len(result.cases),
        "n_cases": spec.n_cases,
        "n_features": spec.n_features,
        "batches": dict(zip(spec.batches, spec.batch_counts, strict=True)),
        "batch_sites": {b: list(s) for b, s in zip(spec.batches, spec.batch_sites, strict=True)},
        "rounds": list(result.rounds),
        "wall_s": wall_s,
        "round_s": query.seconds,
        "refused": query.refused,
        "artifacts": [{
            "kind": "harmonisation", "path": str(path), "round": None, "metrics": metrics,
            "settings_hash": sha256_json(cfg.model_dump(mode="json")),
        }],
    }
