"""Site side of the prognosis protocol: multivariable Cox on a site's covariate table, and the risk tables it is
evaluated from. One function per query action; aggregates only.

A site's :class:`PrognosisSite` holds one :class:`~common.outcomes_site.OutcomesCohort` per split of its
patients (``train`` and ``test`` by the study's ``split_column``, or ``all``); the request's ``split`` picks
one, never more. ``client/steps/prognosis.py`` builds it from ``clinical.csv`` (and a derived feature table);
tests build it from frames (:func:`prognosis_sites_from_frames`).

====================  =============================================================================
action                the site answers
====================  =============================================================================
prognosis_moments     the split's covariate moments and crossproducts, separation summary, event times
prognosis_sums        risk-set and tie sums at the pooled event times for one beta (a Newton step)
prognosis_risk        the split's risk table: per released time and risk-score segment, events and
                      censored counts (each cell >= ``min_cell`` patients), for C-index and td-AUC;
                      and the C-index pair counts among the site's own patients (exact: three numbers)
====================  =============================================================================

Why ``prognosis_sums`` needs the site's explicit ``policy.cox_newton``: the sums over a risk set are
weighted by ``exp(x . beta)`` at a beta the server chooses. With a large beta the weight of the patient with
the largest covariate dominates, and ``s1 / s0`` is that patient's value (``tests/outcomes/test_prognosis.py``
shows it); with several betas the covariate vectors of every risk-set cell can be solved for. Binned times and
merged cells do not prevent this, so only a site that chooses to answer Newton rounds does (as
``exact_outcomes`` is the site's choice for exact times).

Where the policy floors cells (no exact outcomes) a risk table is the weaker, safer release:

* score segments start only at fixed block boundaries (``RISK_BLOCKS`` equal blocks of the bins) and cover the
  bins contiguously, so no boundary sits where a patient's score falls (no min or max). Residual: the server
  places the edges, so one table tells, per time cell, between which of its edges the k-th ranked score lies
  (k a multiple of min_cell): a few bits per cell, once per set of patients;
* no exact within-site pair counts (a threshold-like beta would make them a bit about one patient per request);
* one table per set of patients over the site's lifetime (ledger scope ``prognosis-risk``, whatever the study):
  another beta or other edges would difference its cells, and new studies would add bits;
* a two-valued covariate whose rarer value a few patients hold is refused in the moments round (its
  crossproducts would be their covariates), and so is a categorical level, the reference too (the site step);
* which patients a reply covers does not depend on the covariates named (complete in every column the site
  allows), and a feature table's sums are held against k-means' (ledger scope ``features``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.errors import PolicyError, ProtocolError
from common.outcomes_site import (
    OutcomesCohort,
    _array,
    cohort_ids,
    released,
    site_cox_moments,
    site_cox_newton,
)
from common.pooled_moments import check_matrix
from common.protocol import Payload, SiteFunction
from common.release_ledger import FEATURES, ReleaseLedger

PROGNOSIS_MOMENTS, PROGNOSIS_SUMS, PROGNOSIS_RISK = "prognosis_moments", "prognosis_sums", "prognosis_risk"
PROGNOSIS_ACTIONS: tuple[str, ...] = (PROGNOSIS_MOMENTS, PROGNOSIS_SUMS, PROGNOSIS_RISK)
PROGNOSIS_RISK_SCOPE = "prognosis-risk"  # ledger scope of the risk tables' cells
SPLITS: tuple[str, ...] = ("train", "test", "all")
MAX_RISK_BINS = 512  # a request's score edges are refused beyond this (and beyond the site's histogram_bins)
RISK_BLOCKS = 8  # where cells are floored: score segments start only at these fixed fractions of the bins
MAX_BETA, MIN_SCALE = 50.0, 1e-8  # a risk score's coefficients (on normalised covariates) and scales


@dataclass
class PrognosisSite:
    """One site's prognosis data (stays at the site): a Cox cohort per split, and the site's limits."""

    site_id: str
    cohorts: dict[str, OutcomesCohort]  # by split
    newton_allowed: bool = True  # policy.cox_newton (in-memory parity tests: True)
    max_bins: int = MAX_RISK_BINS  # policy.histogram_bins
    ledger: ReleaseLedger | None = None
    study_key: str = ""
    feature_table: bool = False  # covariates from a derived feature table: its sums are held against k-means'

    def cohort(self, request: Mapping[str, object]) -> OutcomesCohort:
        """The cohort of the request's split (refused when the site has no such split)."""
        split = str(request.get("split", ""))
        if split not in SPLITS:
            raise ProtocolError(self.site_id, "the request names no known split", f"send one of {list(SPLITS)}")
        if split not in self.cohorts:
            raise ProtocolError(self.site_id, f"the site has no {split!r} split of its patients",
                                f"use the splits of the study's split_column ({sorted(self.cohorts)})")
        return self.cohorts[split]


def prognosis_sites_from_frames(frames: Mapping[str, pd.DataFrame], duration_col: str, event_col: str, *,
                                split_column: str | None = None, min_cohort: int = 1, min_cell: int = 1,
                                time_floor: float | None = None) -> dict[str, PrognosisSite]:
    """In-memory sites: every column but the duration, the event and the split is a numeric covariate."""
    out = {}
    for site in sorted(frames):
        frame = frames[site]
        parts = ({"all": frame} if split_column is None else
                 {s: frame[frame[split_column] == s].drop(columns=split_column) for s in ("train", "test")})
        cohorts = {}
        for split, part in parts.items():
            if part.empty:
                continue
            cov = part.drop(columns=[duration_col, event_col])
            cohort = OutcomesCohort(site, durations=part[duration_col].to_numpy(dtype=np.float64),
                                    events=part[event_col].to_numpy(), covariates=cov.to_numpy(dtype=np.float64),
                                    covariate_names=tuple(str(c) for c in cov.columns), min_cohort=min_cohort,
                                    min_cell=min_cell, exact=min_cell <= 1, time_floor=time_floor)
            cohorts[split] = cohort
        out[site] = PrognosisSite(site, cohorts)
    return out


# ============================================================================================ site functions


def site_prognosis_moments(site: PrognosisSite, request: Mapping[str, object]) -> Payload:
    """Round 1: :func:`~common.outcomes_site.site_cox_moments` of the split, and the covariates' crossproducts
    (the pooled covariance fixes the risk score's bins)."""
    cohort = site.cohort(request)
    rel = released(cohort, request)
    x = check_matrix(site.site_id, cohort.covariates, "covariate matrix")[rel.keep]  # type: ignore[arg-type]
    floor = max(int(cohort.min_cell), 1)
    if x.shape[0]:  # any two-valued column (0/1 or not): its crossproducts would be the rarer value's patients'
        low, high = x.min(axis=0), x.max(axis=0)
        two = np.all((x == low) | (x == high), axis=0) & (low < high)
        n_low = (x == low).sum(axis=0)
        rare = two & ((n_low < floor) | (x.shape[0] - n_low < floor))
        if np.any(rare):
            raise PolicyError(site.site_id, "min_cell", f"{int(rare.sum())} two-valued covariate(s) with a value held "
                              f"by fewer than {floor} patients")
    if site.ledger is not None and site.feature_table and cohort.survival_ids:  # the same rows' feature sums
        ids = cohort_ids(site.site_id, cohort.survival_ids, cohort.durations.size)  # type: ignore[union-attr]
        kept = [ids[i] for i in np.flatnonzero(rel.keep)]
        site.ledger.release(FEATURES, kept, [kept], site.study_key, count=False)
    out = site_cox_moments(cohort, request)
    centred = x - x.mean(axis=0)
    out["cross"] = centred.T @ centred
    out["exact_allowed"] = bool(cohort.exact)
    return out


def site_prognosis_sums(site: PrognosisSite, request: Mapping[str, object]) -> Payload:
    """One Newton step (the split's risk-set and tie sums at the request's beta), where the site allows it."""
    if not site.newton_allowed:
        raise PolicyError(site.site_id, "cox_newton", "Cox Newton sums at a requested beta were asked; this site "
                          "does not answer them")
    return site_cox_newton(site.cohort(request), request)


def risk_segments(bins: np.ndarray, floor: int) -> list[tuple[int, int, np.ndarray]]:
    """The rows grouped by score bin, adjacent bins merged in score order until each group holds >= ``floor``
    rows (a short last group joins the one before): ``(lowest bin, highest bin, rows)`` per group, the bins
    being those the group's rows fall in."""
    order = np.argsort(bins, kind="stable")
    groups: list[list[int]] = []
    current: list[int] = []
    for b in np.unique(bins):
        current.extend(int(i) for i in order[bins[order] == b])
        if len(current) >= floor:
            groups.append(current)
            current = []
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return [(int(bins[g].min()), int(bins[g].max()), np.asarray(g, dtype=np.int64)) for g in groups]


def within_site_pairs(lp: np.ndarray, times: np.ndarray, events: np.ndarray, chunk: int = 2048
                      ) -> tuple[float, float, float]:
    """Harrell's pair counts among the site's own patients, exactly (lifelines' rules: an event is compared with
    every later patient and every patient censored at its time): (concordant, tied scores, comparable pairs)."""
    died = events.astype(bool)
    ev = np.flatnonzero(died)
    correct = tied = pairs = 0.0
    for start in range(0, ev.size, chunk):
        i = ev[start:start + chunk]
        partner = (times[None, :] > times[i, None]) | ((times[None, :] == times[i, None]) & ~died[None, :])
        pairs += float(partner.sum())
        correct += float((partner & (lp[None, :] < lp[i, None])).sum())
        tied += float((partner & (lp[None, :] == lp[i, None])).sum())
    return correct, tied, pairs


def site_prognosis_risk(site: PrognosisSite, request: Mapping[str, object]) -> Payload:
    """The split's risk table at the request's beta and score edges.

    Risk score ``lp = ((x - mean) / scale) . beta`` in ``len(edges) + 1`` bins (the outer two open). For each
    released time (exact, or binned with cells merged as for Kaplan-Meier) the patients leaving then are
    grouped into score segments of at least ``min_cell`` of them (adjacent bins merged); each row is ``time,
    first bin, last bin, events, censored``. Released once per split and study.
    """
    cohort = site.cohort(request)
    edges = _array(request, "edges", site.site_id).ravel()
    if edges.size + 1 > site.max_bins or edges.size + 1 > MAX_RISK_BINS:
        raise PolicyError(site.site_id, "histogram_bins", f"{edges.size + 1} risk-score bins asked, the site "
                          f"releases at most {min(site.max_bins, MAX_RISK_BINS)}")
    if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise ProtocolError(site.site_id, "the risk-score edges are not finite and increasing",
                            "send increasing finite edges")
    rel = released(cohort, request)
    x = check_matrix(site.site_id, cohort.covariates, "covariate matrix")[rel.keep]  # type: ignore[arg-type]
    beta, mean, scale = (_array(request, k, site.site_id) for k in ("beta", "mean", "scale"))
    if beta.shape != (x.shape[1],) or mean.shape != beta.shape or scale.shape != beta.shape:
        raise ProtocolError(site.site_id, f"beta/mean/scale do not match the site's {x.shape[1]} covariate(s)",
                            "use the same covariate columns at every site")
    if not (np.all(np.isfinite(beta)) and np.all(np.isfinite(mean)) and np.all(np.isfinite(scale))
            and np.all(scale > 0) and np.all(np.abs(beta) <= MAX_BETA) and np.all(scale >= MIN_SCALE)):
        raise ProtocolError(site.site_id, "beta, mean or scale out of range (non-finite, |beta| > "
                            f"{MAX_BETA:g} or a scale under {MIN_SCALE:g})", "send the fitted model's values")
    lp = ((x - mean) / scale) @ beta
    bins = np.searchsorted(edges, lp, side="right")
    floor = max(int(cohort.min_cell), 1)
    n_bins = edges.size + 1
    if floor > 1:  # segments only at fixed block boundaries (never at a bin where a patient falls)
        width = -(-n_bins // RISK_BLOCKS)
        bins = np.minimum(bins // width, RISK_BLOCKS - 1)
    rows: list[tuple[float, int, int, int, int]] = []
    cells: list[np.ndarray] = []
    keep_index = np.flatnonzero(rel.keep)
    for t in np.unique(rel.times):
        at = np.flatnonzero(rel.times == t)
        segments = risk_segments(bins[at], floor)
        for k, (lo, hi, members) in enumerate(segments):
            idx = at[members]
            ev = int(rel.events[idx].sum())
            if floor > 1:  # contiguous block ranges: from bin 0, each after the one before, the last to the end
                first = 0 if k == 0 else (segments[k - 1][1] + 1) * width
                last = n_bins - 1 if k == len(segments) - 1 else min((hi + 1) * width, n_bins) - 1
                lo, hi = first, last
            rows.append((float(t), lo, hi, ev, int(idx.size) - ev))
            cells.append(keep_index[idx])
    if site.ledger is not None:
        ids = cohort_ids(site.site_id, cohort.survival_ids, cohort.durations.size)  # type: ignore[union-attr]
        universe = hashlib.sha256(" ".join(sorted(ids[i] for i in keep_index)).encode()).hexdigest()[:16]
        if not site.ledger.once(PROGNOSIS_RISK_SCOPE, "site-lifetime", f"risk-{universe}", _digest(request)):
            raise PolicyError(site.site_id, "release_ledger", f"scope {PROGNOSIS_RISK_SCOPE}: one risk table per set "
                              "of patients over the site's lifetime (another beta or other edges, in any study, "
                              "would difference its cells)")
        site.ledger.release(PROGNOSIS_RISK_SCOPE, [ids[i] for i in keep_index],
                            [[ids[i] for i in c] for c in cells], site.study_key)
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    # the exact pair counts only where the site releases exact outcomes anyway (elsewhere a threshold beta
    # would make them a bit per request about one patient's value)
    exact_pairs = bool(cohort.exact and floor <= 1)
    within = np.asarray(within_site_pairs(lp, rel.times, rel.events) if exact_pairs else (0.0, 0.0, 0.0),
                        dtype=np.float64)
    return {"rows": table, "within": within, "within_exact": exact_pairs, "n": int(rel.times.size),
            "bins": int(edges.size + 1), "min_cell": floor}


PROGNOSIS_STEPS: dict[str, SiteFunction] = {
    PROGNOSIS_MOMENTS: site_prognosis_moments,
    PROGNOSIS_SUMS: site_prognosis_sums,
    PROGNOSIS_RISK: site_prognosis_risk,
}
"""The site function of every prognosis action: ``InMemoryQuery(sites, PROGNOSIS_STEPS)``."""

__all__ = ["PROGNOSIS_ACTIONS", "PROGNOSIS_MOMENTS", "PROGNOSIS_RISK", "PROGNOSIS_STEPS", "PROGNOSIS_SUMS",
           "SPLITS", "PrognosisSite", "prognosis_sites_from_frames", "risk_segments"]


def _digest(request: Mapping[str, object]) -> str:
    """What a request asked, as a digest (a rerun asks the very same)."""
    plain = {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in sorted(request.items())}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()
