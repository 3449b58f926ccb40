"""The preprocessing effect: sites preprocess with the plan and report foreground histograms before/after.

The server sends common bin edges per sequence (raw: 0 to 1.25x the largest foreground intensity of the
fingerprint; after: the normalisation's output range with a margin), sums nothing across sites (each site's
histogram is already an aggregate over its cohort), and measures the across-site spread of the median
foreground intensity before and after, relative to the pooled inter-quartile range.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from common.config import StudyConfig
from server.federation import query_sites
from server.phases.base import PhaseContext

log = logging.getLogger("fedbiopsy.server")


def bin_edges(study: StudyConfig, fingerprint: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw and preprocessed bin edges per sequence."""
    norm = study.preprocessing.normalise
    lo, hi = {"nyul": norm.nyul_scale, "percentile": norm.output_range, "zscore": (-3.0, 3.0)}[norm.method]
    margin = 0.25 * (hi - lo)
    bins = study.preprocessing.histogram_bins
    out = {}
    for seq in study.sequences:
        top = 1.25 * float(fingerprint["intensity"][seq]["max"])
        out[seq] = (np.linspace(min(0.0, float(fingerprint["intensity"][seq]["min"])), top, bins + 1),
                    np.linspace(lo - margin, hi + margin, bins + 1))
    return out


def _quantile(hist: np.ndarray, edges: np.ndarray, q: float) -> float:
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    return float(np.interp(q, cdf, centres))


def spread_ratio(hists: dict[str, np.ndarray], edges: np.ndarray) -> float:
    """SD of the sites' median intensities divided by the pooled inter-quartile range."""
    pooled = np.sum(list(hists.values()), axis=0)
    iqr = _quantile(pooled, edges, 0.75) - _quantile(pooled, edges, 0.25)
    medians = [_quantile(h, edges, 0.5) for h in hists.values()]
    return float(np.std(medians, ddof=1) / iqr) if iqr > 0 and len(medians) > 1 else float("nan")


def plot_histograms(replies: dict[str, dict], edges: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> Path:
    """Per-sequence foreground intensity densities per site, before and after preprocessing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = list(edges)
    fig, axes = plt.subplots(len(seqs), 2, figsize=(10, 3.2 * len(seqs)), squeeze=False)
    for row, seq in enumerate(seqs):
        for col, (key, title) in enumerate((("raw_hist", "raw"), ("std_hist", "after preprocessing"))):
            e = edges[seq][col]
            centres = 0.5 * (e[1:] + e[:-1])
            ax = axes[row][col]
            for site, reply in sorted(replies.items()):
                h = np.asarray(reply[f"{seq}/{key}"], dtype=float)
                ax.plot(centres, h / max(h.sum() * np.diff(e).mean(), 1e-12), label=site)
            ax.set_title(f"{seq}: {title}")
            ax.set_xlabel("foreground intensity")
            ax.set_ylabel("density")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def apply_at_sites(ctx: PhaseContext, node_ids: list[int]) -> dict:
    """Ask the sites to preprocess with the delivered plan; return the before/after summary and figure."""
    edges = bin_edges(ctx.study, ctx.outputs["fingerprint"])
    payload: dict[str, object] = {}
    for seq, (raw, std) in edges.items():
        payload[f"{seq}/raw_edges"] = raw
        payload[f"{seq}/std_edges"] = std
    result = query_sites(ctx.grid, "preprocessing_apply", ctx.study, payload, node_ids=node_ids)
    spread = {}
    for seq, (raw, std) in edges.items():
        before = spread_ratio({s: np.asarray(r[f"{seq}/raw_hist"]) for s, r in result.replies.items()}, raw)
        after = spread_ratio({s: np.asarray(r[f"{seq}/std_hist"]) for s, r in result.replies.items()}, std)
        spread[seq] = {"before": before, "after": after, "shrink": before / after if after > 0 else float("inf")}
    figure = plot_histograms(result.replies, edges, ctx.result_dir / "preprocessing" / "histograms.png")
    log.info("preprocessing at the sites: median-intensity spread shrink %s",
             {s: round(v["shrink"], 1) for s, v in spread.items()})
    return {
        "cases_per_site": {s: int(r["n_cases"]) for s, r in result.replies.items()},  # type: ignore[call-overload]
        "failed_per_site": {s: int(r["n_failed"]) for s, r in result.replies.items()},  # type: ignore[call-overload]
        "spread": spread,
        "figures": {"histograms": str(figure)},
        "refused": {str(n): reason for n, reason in result.errors.items()},
    }
