"""The fingerprint protocol: per-site aggregates of geometry and foreground intensities, and their merge.

Site step: :func:`site_fingerprint` over the site's own cases (never more than aggregates over at least
``min_cohort`` cases). Server step: :func:`aggregate_fingerprints`, which merges the sites exactly where
the statistic allows it (counts, means, standard deviations, extremes) and as a case-weighted mean of the
sites' quantiles otherwise (medians and percentiles are not decomposable; nnU-Net's own planner is equally
served by a weighted median of site medians).

Privacy: with ``cell_floor`` 1 (the site's policy allows exact outcomes) the site sends the statistics as they
are. Otherwise no case's value and no extreme voxel leaves: at most :data:`MAX_PERCENTILES` percentiles, in
:data:`PERCENTILE_RANGE` (0 and 100 are one voxel's intensity; rule ``percentiles``); a pooled voxel quantile
is sent only where at least ``cell_floor`` cases have sampled voxels on each side of it, else the mean over
cases of their own quantile; ``min_max`` is the mean over cases of each case's lowest and highest sampled
intensity (not one voxel's); and the spacing and shape "medians" are the means of the middle ``cell_floor``
cases (:func:`middle_mean`), an odd-count median being one case's value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import PolicyError, ProtocolError
from common.hashing import sha256_json
from common.protocol import Payload, Query
from common.replies import reply_field

FINGERPRINT = "fingerprint"  # the one round: each site measures its cases with masks
PERCENTILE_RANGE = (0.5, 99.5)  # the intensity percentiles a site releases (outside: one voxel's value)
MAX_PERCENTILES = 16  # more, placed at the server's choice, would hit the sorted voxel values one by one


@dataclass(frozen=True)
class CaseMeasure:
    """What one case contributes to its site's fingerprint (never leaves the site)."""

    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    foreground: Mapping[str, np.ndarray]  # sampled foreground voxel intensities per sequence


def middle_mean(values: np.ndarray, k: int) -> np.ndarray:
    """Per column, the mean of the middle ``k`` sorted values (all of them when fewer): a robust centre that is
    not one case's value unless ``k`` cases share it. ``k`` 1 is the median of an odd count."""
    v = np.sort(np.asarray(values, dtype=np.float64), axis=0)
    n = v.shape[0]
    m = min(n, max(k, 1 if n % 2 else 2))
    start = (n - m) // 2
    return np.asarray(v[start:start + m].mean(axis=0))


def check_percentiles(site_id: str, percentiles: Sequence[float]) -> None:
    """Refuse (rule ``percentiles``) intensity percentiles outside :data:`PERCENTILE_RANGE`, or more than
    :data:`MAX_PERCENTILES` of them."""
    if len(percentiles) > MAX_PERCENTILES:
        raise PolicyError(site_id, "percentiles", f"{len(percentiles)} intensity percentiles requested; the site "
                          f"releases at most {MAX_PERCENTILES}")
    lo, hi = PERCENTILE_RANGE
    outside = [float(p) for p in percentiles if not lo <= float(p) <= hi]
    if outside:
        raise PolicyError(site_id, "percentiles", f"intensity percentile(s) {outside} requested; the site releases "
                          f"percentiles in [{lo}, {hi}] only (0 and 100 are single voxels)")


def _released_quantiles(per_case: Sequence[np.ndarray], values: np.ndarray, percentiles: Sequence[float],
                        floor: int) -> np.ndarray:
    """Pooled quantiles where at least ``floor`` cases have samples on each side, else the mean per-case quantile."""
    pooled = np.percentile(values, percentiles)
    fallback = np.mean([np.percentile(v, percentiles) for v in per_case], axis=0)
    lows = np.array([[v.min() <= q for q in pooled] for v in per_case]).sum(axis=0)
    highs = np.array([[v.max() >= q for q in pooled] for v in per_case]).sum(axis=0)
    ok = (lows >= floor) & (highs >= floor)
    return np.where(ok, pooled, fallback)


def site_fingerprint(site_id: str, cases: Sequence[CaseMeasure], sequences: Sequence[str],
                     percentiles: Sequence[float], min_cohort: int, cell_floor: int = 1) -> Payload:
    """The site step: aggregates over ``cases``; refuses when fewer than ``min_cohort`` cases.

    ``cell_floor`` above 1 (the site's :attr:`~common.sitedata.SitePolicy.cell_floor`) makes every released
    statistic one that no single case or voxel determines (see the module docstring).
    """
    n = len(cases)
    if n < min_cohort:
        raise PolicyError(site_id, "min_cohort", f"{n} valid case(s) with masks, policy needs at least {min_cohort}")
    guarded = cell_floor > 1
    if guarded:
        check_percentiles(site_id, percentiles)
    spacing = np.array([c.spacing for c in cases], dtype=np.float64)
    shape = np.array([c.shape for c in cases], dtype=np.float64)
    centre = (lambda v: middle_mean(v, cell_floor)) if guarded else (lambda v: np.median(v, axis=0))
    out: Payload = {
        "n_cases": n,
        "spacing_sum": spacing.sum(axis=0),
        "spacing_median": centre(spacing),
        "shape_sum": shape.sum(axis=0),
        "shape_median": centre(shape),
        "percentiles": np.asarray(percentiles, dtype=np.float64),
    }
    for seq in sequences:
        per_case = [np.asarray(c.foreground[seq], dtype=np.float64).ravel() for c in cases]
        if guarded and any(v.size == 0 for v in per_case):
            raise ProtocolError(site_id, f"a case has no {seq} foreground sample", "validate the site's masks")
        values = np.concatenate(per_case)
        out[f"{seq}/n"] = int(values.size)
        out[f"{seq}/sum"] = np.array([values.sum()])
        out[f"{seq}/sumsq"] = np.array([np.square(values).sum()])
        if guarded:
            out[f"{seq}/min_max"] = np.array([np.mean([v.min() for v in per_case]),
                                              np.mean([v.max() for v in per_case])])
            out[f"{seq}/quantiles"] = _released_quantiles(per_case, values, percentiles, cell_floor)
        else:
            out[f"{seq}/min_max"] = np.array([values.min(), values.max()])
            out[f"{seq}/quantiles"] = np.percentile(values, percentiles)
    return out


def case_manifest_hash(case_files: Mapping[str, Mapping[str, str]], extra: Mapping[str, str] | None = None) -> str:
    """The site's data fingerprint: sha256 over its sorted case ids, each with the sha256 of each of its files.

    ``case_files``: {case id: {file role: sha256}}; ``extra``: site-level files (e.g. the clinical table).
    Only this hash leaves the site: it pins the exact data a site used without revealing any identifier.
    """
    return sha256_json({"cases": [[cid, dict(case_files[cid])] for cid in sorted(case_files)],
                        "extra": dict(extra or {})})


def _field(site: str, reply: Mapping[str, object], key: str) -> np.ndarray:
    return reply_field(site, reply, key, "fingerprint", "validate the site's images")


def aggregate_fingerprints(replies: Mapping[str, Mapping[str, object]], sequences: Sequence[str]) -> dict:
    """The server step: one global fingerprint from the sites' replies (keyed by site id)."""
    if not replies:
        raise ProtocolError("(none)", "no site answered the fingerprint query")
    sites = sorted(replies)
    counts = {s: int(_field(s, replies[s], "n_cases")) for s in sites}
    total = sum(counts.values())
    w = np.array([counts[s] for s in sites], dtype=np.float64) / total
    pct = _field(sites[0], replies[sites[0]], "percentiles")
    for s in sites[1:]:
        if not np.array_equal(_field(s, replies[s], "percentiles"), pct):
            raise ProtocolError(s, "used other percentiles than the first site", "send one study config to all sites")
    result: dict = {
        "n_sites": len(sites),
        "n_cases": total,
        "cases_per_site": counts,
        "spacing_mean": (np.sum([_field(s, replies[s], "spacing_sum") for s in sites], axis=0) / total).tolist(),
        "spacing_median": (w @ np.stack([_field(s, replies[s], "spacing_median") for s in sites])).tolist(),
        "shape_mean": (np.sum([_field(s, replies[s], "shape_sum") for s in sites], axis=0) / total).tolist(),
        "shape_median": (w @ np.stack([_field(s, replies[s], "shape_median") for s in sites])).tolist(),
        "intensity": {},
    }
    for seq in sequences:
        n = sum(int(_field(s, replies[s], f"{seq}/n")) for s in sites)
        s1 = sum(float(_field(s, replies[s], f"{seq}/sum")[0]) for s in sites)
        s2 = sum(float(_field(s, replies[s], f"{seq}/sumsq")[0]) for s in sites)
        mm = np.stack([_field(s, replies[s], f"{seq}/min_max") for s in sites])
        nv = np.array([int(_field(s, replies[s], f"{seq}/n")) for s in sites], dtype=np.float64)
        q = (nv / nv.sum()) @ np.stack([_field(s, replies[s], f"{seq}/quantiles") for s in sites])
        mean = s1 / n
        result["intensity"][seq] = {
            "n_voxels": n,
            "mean": mean,
            "std": float(np.sqrt(max(s2 / n - mean**2, 0.0) * n / max(n - 1, 1))),
            "min": float(mm[:, 0].min()),
            "max": float(mm[:, 1].max()),
            "percentiles": dict(zip([f"p{p:g}" for p in pct], q.tolist(), strict=True)),
        }
    result["target_spacing"] = result["spacing_median"]
    return result


def run_fingerprint(query: Query, sequences: Sequence[str]) -> dict:
    """Drive the fingerprint round: the merged fingerprint, each site's scanner and its data version.

    The data versions (manifest hash and case count per site) go to the registry; never a patient identifier.
    """
    replies = query(FINGERPRINT, {})
    merged = aggregate_fingerprints(replies, sequences)
    merged["scanners"] = {s: {"vendor": r.get("vendor"), "field_strength": r.get("field_strength")}
                          for s, r in replies.items()}
    merged["data_fingerprints"] = {
        s: {"manifest_hash": r.get("manifest_hash"), "n_cases": int(r.get("manifest_cases", r["n_cases"]))}  # type: ignore[call-overload]
        for s, r in replies.items()
    }
    return merged
