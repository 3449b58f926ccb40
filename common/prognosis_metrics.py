"""Survival-model metrics from the sites' risk tables (:func:`common.prognosis_site.site_prognosis_risk`), on
the server, each with the error bound its score bins allow.

A table row is ``time, first bin, last bin, events, censored``: the patients of one site leaving at one
released time whose risk scores fall in those bins. Pairs (or patients) whose scores the bins cannot order
count one half (or at the bin's middle), and the bound is the largest error that can make:

* :func:`concordance`: Harrell's C (lifelines' ``concordance_index`` of ``-risk``), pairs within a site from
  the site's exact counts; with ``censoring``, Uno's IPCW C (scikit-survival's ``concordance_index_ipcw``);
* :func:`dynamic_auc`: the cumulative/dynamic AUC (scikit-survival's ``cumulative_dynamic_auc``);
* :func:`brier_score`: the IPCW Brier score of the model's survival at a horizon (scikit-survival's
  ``brier_score``), from the Breslow baseline;
* :func:`calibration`: predicted against Kaplan-Meier survival at a horizon, per risk group.

The censoring distribution (:func:`censoring_survival`, scikit-survival's reverse Kaplan-Meier) comes from the
train split's table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.errors import ProtocolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RiskTable:
    """Pooled rows ``time, first bin, last bin, events, censored`` (and the site of each row)."""

    rows: np.ndarray  # (m, 5)
    sites: np.ndarray  # (m,) site index into ``site_ids``
    site_ids: tuple[str, ...]
    n_bins: int
    within: np.ndarray | None = None  # (n_sites, 3): each site's exact concordant, tied and comparable pairs
    within_exact: np.ndarray | None = None  # (n_sites,): whether the site sent them (sites with exact outcomes)

    def of_site(self, site: str) -> RiskTable:
        k = self.site_ids.index(site)
        keep = self.sites == k
        within = None if self.within is None else self.within[k:k + 1]
        exact = None if self.within_exact is None else self.within_exact[k:k + 1]
        return RiskTable(self.rows[keep], np.zeros(int(keep.sum()), np.int64), (site,), self.n_bins, within, exact)

    @property
    def n(self) -> int:
        return int(self.rows[:, 3:].sum())


def merge_risk_tables(replies: Mapping[str, Mapping[str, object]], n_bins: int) -> RiskTable:
    """The server step: every site's rows, checked (shape, finite, bins in range, counts non-negative)."""
    sites = tuple(sorted(replies))
    rows, owner, within, exact = [], [], [], []
    for k, site in enumerate(sites):
        r = np.asarray(replies[site].get("rows", []), dtype=np.float64).reshape(-1, 5) \
            if "rows" in replies[site] else None
        if r is None:
            raise ProtocolError(site, "risk reply lacks 'rows'", "run the same fedbiopsy version at every site")
        lo, hi, counts = r[:, 1], r[:, 2], r[:, 3:]
        if (not np.all(np.isfinite(r)) or np.any(lo < 0) or np.any(hi >= n_bins) or np.any(lo > hi)
                or np.any(counts < 0) or np.any(counts != np.round(counts))):
            raise ProtocolError(site, "risk reply rows are out of range (bins, counts)",
                                "run the same fedbiopsy version at every site")
        w = np.asarray(replies[site].get("within", [np.nan] * 3), dtype=np.float64).ravel()
        if w.size != 3 or not np.all(np.isfinite(w)) or np.any(w < 0) or w[0] + w[1] > w[2]:
            raise ProtocolError(site, "risk reply 'within' is not three pair counts",
                                "run the same fedbiopsy version at every site")
        rows.append(r)
        owner.append(np.full(r.shape[0], k, dtype=np.int64))
        within.append(w)
        exact.append(bool(replies[site].get("within_exact", False)))
    return RiskTable(np.concatenate(rows) if rows else np.zeros((0, 5)),
                     np.concatenate(owner) if owner else np.zeros(0, np.int64), sites, n_bins,
                     np.asarray(within).reshape(-1, 3), np.asarray(exact, dtype=bool))


@dataclass(frozen=True)
class Bounded:
    """A metric from binned scores: the estimate (ambiguous pairs one half) and its error bound."""

    value: float
    bound: float
    pairs: float

    def as_dict(self) -> dict:
        return {"value": self.value, "bound": self.bound, "pairs": self.pairs}


def _order(lo_i: np.ndarray, hi_i: np.ndarray, lo_j: np.ndarray, hi_j: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """For segment pairs: whether j's scores are all below i's (concordant), and whether the segments overlap."""
    below = hi_j[None, :] < lo_i[:, None]
    above = lo_j[None, :] > hi_i[:, None]
    return below, ~(below | above)


def _harrell_pairs(r: np.ndarray, ev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the event rows ``r[ev]`` against every row: how many comparable pairs (lifelines' rules: a later
    patient, or one censored at the event's time) per event, whether the other's scores are all below, and
    whether the segments overlap."""
    ri = r[ev]
    t_i, t_j = ri[:, 0][:, None], r[:, 0][None, :]
    partners = (t_j > t_i) * (r[:, 3] + r[:, 4])[None, :] + (t_j == t_i) * r[:, 4][None, :]
    below, overlap = _order(ri[:, 1], ri[:, 2], r[:, 1], r[:, 2])
    return ri[:, 3][:, None] * partners, below, overlap


def concordance(table: RiskTable) -> Bounded:
    """Harrell's C-index of the risk scores (higher risk, earlier event), as lifelines' ``concordance_index``
    of ``-risk``: an event at ``t`` is compared with every patient leaving after ``t`` and every patient
    censored at ``t``. Pairs within a site are the site's exact counts; pairs across sites come from the risk
    tables (overlapping segments count one half: the bound)."""
    r = table.rows
    if table.within is not None:
        w_correct, w_tied, w_pairs = (float(v) for v in table.within.sum(axis=0))
    else:
        w_correct = w_tied = w_pairs = 0.0
    ev = r[:, 3] > 0
    conc = amb = pairs = 0.0
    if ev.any():
        weight, below, overlap = _harrell_pairs(r, ev)
        if table.within is not None and table.within_exact is not None:  # counted exactly at their site
            same = table.sites[ev][:, None] == table.sites[None, :]
            weight = weight * ~(same & table.within_exact[table.sites][None, :])
        pairs = float(weight.sum())
        conc = float((weight * below).sum())
        amb = float((weight * overlap).sum())
    total = pairs + w_pairs
    if total == 0:
        return Bounded(float("nan"), float("nan"), 0.0)
    return Bounded((conc + 0.5 * amb + w_correct + 0.5 * w_tied) / total, 0.5 * amb / total, total)


def censoring_survival(table: RiskTable) -> tuple[np.ndarray, np.ndarray]:
    """The reverse Kaplan-Meier of the censoring times (scikit-survival's ``CensoringDistributionEstimator``):
    at each time, censored / (at risk - events); (times, G) with G at and after each time."""
    r = table.rows
    times = np.unique(r[:, 0])
    d = np.array([r[r[:, 0] == t, 3].sum() for t in times])
    c = np.array([r[r[:, 0] == t, 4].sum() for t in times])
    at_risk = np.array([r[r[:, 0] >= t, 3:].sum() for t in times]) - d
    ratio = np.divide(c, at_risk, out=np.zeros(times.size), where=c != 0)
    return times, np.cumprod(1.0 - ratio)


def _step(times: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """A right-continuous step function (1 before the first time)."""
    idx = np.searchsorted(times, at, side="right") - 1
    return np.where(idx >= 0, values[np.clip(idx, 0, None)], 1.0)


def dynamic_auc(table: RiskTable, horizon: float, censoring: tuple[np.ndarray, np.ndarray]) -> Bounded:
    """The cumulative/dynamic AUC at ``horizon`` (scikit-survival's ``cumulative_dynamic_auc``): cases are
    events by the horizon, weighted by 1 / G(their time); controls everyone still event-free after it."""
    r = table.rows
    case = (r[:, 0] <= horizon) & (r[:, 3] > 0)
    control = r[:, 0] > horizon
    if not case.any() or not control.any():
        return Bounded(float("nan"), float("nan"), 0.0)
    g = _step(*censoring, r[case, 0])
    if np.any(g <= 0):
        log.warning("AUC at %g undefined: the censoring survival is zero at a case's time; choose an earlier "
                    "horizon", horizon)
        return Bounded(float("nan"), float("nan"), 0.0)
    w_case = r[case, 3] / g
    m_control = r[control, 3] + r[control, 4]
    weight = w_case[:, None] * m_control[None, :]
    below, overlap = _order(r[case, 1], r[case, 2], r[control, 1], r[control, 2])
    total = float(weight.sum())
    conc, amb = float((weight * below).sum()), float((weight * overlap).sum())
    return Bounded((conc + 0.5 * amb) / total, 0.5 * amb / total, float(r[case, 3].sum() * m_control.sum()))




def uno_concordance(table: RiskTable, censoring: tuple[np.ndarray, np.ndarray]) -> Bounded:
    """Uno's C (scikit-survival's ``concordance_index_ipcw``, no truncation): Harrell's pairs, each event
    weighted by 1 / G(its time)^2 with G the train censoring survival; from the tables alone."""
    r = table.rows
    ev = r[:, 3] > 0
    if not ev.any():
        return Bounded(float("nan"), float("nan"), 0.0)
    ri = r[ev]
    g = _step(*censoring, ri[:, 0])
    if np.any(g <= 0):  # as scikit-survival, undefined: reported as missing, Harrell's C stands
        log.warning("Uno's C undefined: the censoring survival is zero at an event's time")
        return Bounded(float("nan"), float("nan"), 0.0)
    pairs, below, overlap = _harrell_pairs(r, ev)
    weight = pairs / (g**2)[:, None]
    total = float(weight.sum())
    if total == 0:
        return Bounded(float("nan"), float("nan"), 0.0)
    conc, amb = float((weight * below).sum()), float((weight * overlap).sum())
    return Bounded((conc + 0.5 * amb) / total, 0.5 * amb / total, float(pairs.sum()))


def breslow_baseline(event_times: np.ndarray, deaths: np.ndarray, s0: np.ndarray, durations: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """lifelines' Breslow baseline cumulative hazard at the train durations, from the pooled risk-set sums at
    the fitted beta: ``H0(t) = sum over event times <= t of deaths / sum_at_risk exp(lp)``."""
    steps = np.cumsum(np.asarray(deaths, dtype=np.float64) / np.asarray(s0, dtype=np.float64))
    idx = np.searchsorted(np.asarray(event_times, dtype=np.float64), durations, side="right") - 1
    return np.asarray(durations, dtype=np.float64), np.where(idx >= 0, steps[np.clip(idx, 0, None)], 0.0)


def _lp_range(rows: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's linear-predictor range (outer bins open) and the point used for it (the finite middle)."""
    full = np.concatenate([[-np.inf], edges, [np.inf]])
    lo, hi = full[rows[:, 1].astype(int)], full[rows[:, 2].astype(int) + 1]
    mid = np.where(np.isfinite(lo) & np.isfinite(hi), (lo + hi) / 2, np.where(np.isfinite(lo), lo, hi))
    return lo, hi, mid


def brier_score(table: RiskTable, horizon: float, censoring: tuple[np.ndarray, np.ndarray],
                baseline: tuple[np.ndarray, np.ndarray], edges: np.ndarray) -> Bounded:
    """The IPCW Brier score at ``horizon`` of the model's survival ``exp(-H0(horizon) exp(lp))`` (H0 interpolated
    linearly between the train durations, as lifelines predicts), as scikit-survival's ``brier_score``."""
    r = table.rows
    n = float(r[:, 3:].sum())
    if n == 0:
        return Bounded(float("nan"), float("nan"), 0.0)
    h0 = float(np.interp(horizon, *baseline))
    lo, hi, mid = _lp_range(r, edges)

    def surv(lp: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return np.exp(-h0 * np.exp(lp))

    s_mid, s_top, s_bottom = surv(mid), surv(lo), surv(hi)  # survival falls with risk
    case = (r[:, 0] <= horizon) & (r[:, 3] > 0)
    control = r[:, 0] > horizon
    g_case = _step(*censoring, r[:, 0])
    g_h = float(_step(*censoring, np.array([horizon]))[0])
    if np.any(g_case[case] <= 0) or g_h <= 0:
        log.warning("Brier score at %g undefined: the censoring survival is zero before it; choose an earlier "
                    "horizon", horizon)
        return Bounded(float("nan"), float("nan"), 0.0)
    w_case = np.where(case, r[:, 3] / np.where(case, g_case, 1.0), 0.0)
    w_control = np.where(control, (r[:, 3] + r[:, 4]) / g_h, 0.0)

    def terms(s: np.ndarray) -> np.ndarray:
        return w_case * s**2 + w_control * (1 - s) ** 2

    value = terms(s_mid)
    error = np.maximum(np.abs(terms(s_top) - value), np.abs(terms(s_bottom) - value))
    return Bounded(float(value.sum() / n), float(error.sum() / n), n)


def calibration(table: RiskTable, horizon: float, baseline: tuple[np.ndarray, np.ndarray], edges: np.ndarray,
                groups: int = 5) -> list[dict]:
    """Predicted (mean model survival at the bins' middles) against observed (Kaplan-Meier) survival at
    ``horizon`` in ``groups`` risk groups of about equal size (rows by their middle bin)."""
    r = table.rows
    if r.shape[0] == 0:
        return []
    h0 = float(np.interp(horizon, *baseline))
    _, _, mid = _lp_range(r, edges)
    order = np.argsort(mid, kind="stable")
    counts = r[order, 3] + r[order, 4]
    position = (np.cumsum(counts) - counts / 2) / counts.sum()
    label = np.empty(r.shape[0], dtype=np.int64)
    label[order] = np.minimum((position * groups).astype(int), groups - 1)
    out = []
    for g in range(groups):
        rows = r[label == g]
        if rows.shape[0] == 0:
            continue
        n = rows[:, 3:].sum(axis=1)
        with np.errstate(over="ignore"):
            predicted = float((np.exp(-h0 * np.exp(mid[label == g])) * n).sum() / n.sum())
        km = 1.0
        for t in np.unique(rows[:, 0]):
            if t > horizon:
                break
            at_risk = rows[rows[:, 0] >= t, 3:].sum()
            km *= 1.0 - rows[rows[:, 0] == t, 3].sum() / at_risk
        out.append({"group": g + 1, "n": int(n.sum()), "events": int(rows[:, 3].sum()), "predicted": predicted,
                    "observed": float(km)})
    return out
