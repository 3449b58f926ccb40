"""Server half of the reduction phase: the image-based signature from pooled feature statistics.

One round of sums and crossproducts (:func:`common.reduction.run_reduction`, over ``ctx.query()``), then a
broadcast of the signature so that each site scores its own patients. The signature (kept features, pooled
correlations, varimax loadings) is stored as ``reduction/signature.npz`` for the registry.
"""

from __future__ import annotations

import time

import numpy as np

from common.hashing import sha256_file, sha256_json
from common.reduction import run_reduction, settings_from_config
from server.phases.base import PhaseContext

SIGNATURE_FILE = "signature.npz"
TOP_LOADINGS = 10


def run(ctx: PhaseContext) -> dict:
    """Run the federated reduction over the connected sites; returns the summary and the signature artifact."""
    cfg = ctx.study.reduction
    settings = settings_from_config(cfg)
    query = ctx.query()
    start = time.perf_counter()
    result = run_reduction(query, settings)
    wall_s = time.perf_counter() - start
    sig = result.signature
    path = sig.save(ctx.result_dir / "reduction" / SIGNATURE_FILE)
    ctx.participants["reduction"] = dict(result.cases)
    loadings = sig.loadings
    top = {f: loadings[f].abs().sort_values(ascending=False).index[:TOP_LOADINGS].tolist() for f in loadings.columns}
    explained = (np.square(loadings.to_numpy()).sum(axis=0) / max(len(sig.kept), 1)).tolist()
    pooled = {"n_cases": float(sig.n_cases), "n_features_in": float(len(sig.features)),
              "n_kept": float(len(sig.kept)), "n_factors": float(loadings.shape[1]),
              "explained_variance": float(sum(explained))}
    metrics: dict[str, dict[str, float]] = {"pooled": pooled}
    metrics.update({site: {"n_cases": float(n)} for site, n in result.cases.items()})
    harmonised = "harmonisation" in ctx.outputs and cfg.input_file == ctx.study.harmonisation.output_file
    artifact = {"kind": "signature", "path": str(path), "round": None, "metrics": metrics,
                "settings_hash": sha256_json(cfg.model_dump(mode="json"))}
    if harmonised:
        artifact["parent_kind"] = "harmonisation"
    return {
        "signature": str(path),
        "signature_sha256": sha256_file(path),
        "input_file": cfg.input_file,
        "wall_s": wall_s,
        "round_s": query.seconds,
        "n_sites": len(result.cases),
        "n_cases": sig.n_cases,
        "kept": sig.kept,
        "dropped": sig.dropped,
        "explained_variance": dict(zip(loadings.columns, explained, strict=True)),
        "top_features": top,
        "refused": query.refused,
        "artifacts": [artifact],
    }
