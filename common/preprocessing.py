"""The preprocessing protocol: federated Nyúl landmarks, the global plan delivered, and its measured effect.

Rounds, by action:

=====================  ====================================================  ==============================
action                 a site sends (aggregates only)                        the server computes
=====================  ====================================================  ==============================
nyul_landmarks         mean Nyúl landmarks over its cases, per sequence      the standard scale, the plan
preprocessing_plan     the sha256 of the plan it stored                      that every site holds the plan
preprocessing_apply    foreground histograms summed over its cases, before   the across-site spread of the
                       and after preprocessing, on the server's bin edges    median intensity, before/after
=====================  ====================================================  ==============================

The site steps are in ``client/steps/preprocessing.py`` (they read images); the driver
:func:`run_preprocessing` and the server maths are here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.config import StudyConfig
from common.errors import ProtocolError
from common.hashing import canonical_json, sha256_text
from common.nyul import aggregate_nyul
from common.plan import PreprocessingPlan, build_plan
from common.protocol import Payload, Query
from common.replies import read_count

log = logging.getLogger(__name__)
NYUL_LANDMARKS, PLAN, APPLY = "nyul_landmarks", "preprocessing_plan", "preprocessing_apply"
Edges = dict[str, tuple[np.ndarray, np.ndarray]]
PREPROCESSED, RAW = "preprocessed", "raw"


def imaging_inputs(study: StudyConfig) -> str:
    """What the imaging phases of ``study`` read: ``"preprocessed"`` (the sites' ``derived/preprocessed/`` cases
    on the plan's target grid) when the study runs the preprocessing phase and applies it at the sites (which
    needs the fingerprint phase), else ``"raw"`` (the site's own images on their native grids)."""
    phases = set(study.phases)
    applied = {"fingerprint", "preprocessing"} <= phases and study.preprocessing.apply_at_sites
    return PREPROCESSED if applied else RAW


def bin_edges(study: StudyConfig, fingerprint: Mapping) -> Edges:
    """Raw and preprocessed histogram bin edges per sequence.

    Raw: 0 (or the fingerprint's minimum) to 1.25x the largest foreground intensity of the fingerprint;
    after: the normalisation's output range with a margin.
    """
    norm = study.preprocessing.normalise
    lo, hi = {"nyul": norm.nyul_scale, "percentile": norm.output_range, "zscore": (-3.0, 3.0)}[norm.method]
    margin = 0.25 * (hi - lo)
    bins = study.preprocessing.histogram_bins
    out = {}
    for seq in study.intensity_sequences:  # the normalisation's effect: parametric maps are not normalised
        top = 1.25 * float(fingerprint["intensity"][seq]["max"])
        out[seq] = (np.linspace(min(0.0, float(fingerprint["intensity"][seq]["min"])), top, bins + 1),
                    np.linspace(lo - margin, hi + margin, bins + 1))
    return out


def _quantile(hist: np.ndarray, edges: np.ndarray, q: float) -> float:
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    return float(np.interp(q, cdf, centres))


def spread_ratio(hists: Mapping[str, np.ndarray], edges: np.ndarray) -> float:
    """SD of the sites' median intensities divided by the pooled inter-quartile range."""
    pooled = np.sum(list(hists.values()), axis=0)
    iqr = _quantile(pooled, edges, 0.75) - _quantile(pooled, edges, 0.25)
    medians = [_quantile(h, edges, 0.5) for h in hists.values()]
    return float(np.std(medians, ddof=1) / iqr) if iqr > 0 and len(medians) > 1 else float("nan")


def effect_request(edges: Edges) -> Payload:
    """The apply round's request: every sequence's raw and preprocessed bin edges."""
    payload: Payload = {}
    for seq, (raw, std) in edges.items():
        payload[f"{seq}/raw_edges"] = raw
        payload[f"{seq}/std_edges"] = std
    return payload


@dataclass(frozen=True)
class PreprocessingEffect:
    """The apply round: each site's histograms, the bin edges, and the spread before/after per sequence."""

    replies: dict[str, Payload]
    edges: Edges
    spread: dict[str, dict[str, float]]

    def summary(self) -> dict:
        """Cases and failures per site, and the spread per sequence (JSON-ready)."""
        return {
            "cases_per_site": {s: int(r["n_cases"]) for s, r in self.replies.items()},  # type: ignore[call-overload]
            "failed_per_site": {s: read_count(s, r["n_failed"]) for s, r in self.replies.items()},
            "spread": self.spread,
        }


def measure_effect(replies: Mapping[str, Payload], edges: Edges) -> PreprocessingEffect:
    """The across-site spread of the median foreground intensity before and after preprocessing."""
    spread = {}
    for seq, (raw, std) in edges.items():
        before = spread_ratio({s: np.asarray(r[f"{seq}/raw_hist"]) for s, r in replies.items()}, raw)
        after = spread_ratio({s: np.asarray(r[f"{seq}/std_hist"]) for s, r in replies.items()}, std)
        spread[seq] = {"before": before, "after": after, "shrink": before / after if after > 0 else float("inf")}
    return PreprocessingEffect(dict(replies), edges, spread)


@dataclass(frozen=True)
class PreprocessingResult:
    """The plan, its hash, the Nyúl case counts per site, who stored the plan, and the effect (when applied)."""

    plan: PreprocessingPlan
    plan_sha256: str
    counts: dict[str, int]
    delivered_to: list[str]
    effect: PreprocessingEffect | None


def run_preprocessing(query: Query, study: StudyConfig, spacing: Sequence[float],
                      fingerprint: Mapping | None = None) -> PreprocessingResult:
    """Drive the rounds: Nyúl landmarks, the plan delivered and checked and, with a fingerprint, the effect.

    With ``fingerprint`` (the fingerprint phase's output) the sites also preprocess their cohort with the
    plan and report histograms; without it only the plan is built and delivered.
    """
    x, y, z = (float(s) for s in spacing)
    nyul = aggregate_nyul(query(NYUL_LANDMARKS, {"target_spacing": np.asarray((x, y, z), dtype=np.float64)}),
                          study.intensity_sequences)
    counts = {str(s): int(n) for s, n in nyul["cases_per_site"].items()}
    plan = build_plan(study, (x, y, z), nyul, counts)
    plan_json = canonical_json(plan.model_dump(mode="json"))
    sha = sha256_text(plan_json)
    acks = query(PLAN, {"plan_json": plan_json})
    for site, reply in acks.items():
        if reply.get("plan_sha256") != sha:
            raise ProtocolError(site, "stored a plan whose hash differs from the server's",
                                "run the same fedbiopsy version at every site")
    log.info("preprocessing plan %s: spacing %s, Nyúl over %d case(s) at %d site(s)", sha[:12],
             [round(s, 3) for s in (x, y, z)], nyul["n_cases"], len(counts))
    effect = None
    if fingerprint is not None:
        edges = bin_edges(study, fingerprint)
        effect = measure_effect(query(APPLY, effect_request(edges)), edges)
        log.info("preprocessing at the sites: median-intensity spread shrink %s",
                 {s: round(v["shrink"], 1) for s, v in effect.spread.items()})
    return PreprocessingResult(plan, sha, counts, sorted(acks), effect)
