"""Federated Kaplan-Meier and log-rank from per-site, per-group event tables, equal to lifelines on the pooled data.

Site step: :func:`site_survival_table` validates the site's durations/events/groups and answers, for each
group and each (released) time, how many patients left the risk set (``removed``) and how many of those
had the event (``observed``). Server steps: :func:`merge_survival_tables` (the counts add up exactly),
:func:`kaplan_meier` (lifelines' product-limit estimate and exponential-Greenwood interval, computed the
way ``KaplanMeierFitter`` does) and :func:`logrank_test` (lifelines' ``multivariate_logrank_test``, two or
more groups).

Privacy. In **exact** mode a table holds the site's distinct follow-up times: patient-level times. It is
used only where the site's policy allows it (``SitePolicy.exact_outcomes``). Otherwise the site **bins**
every time up to the end of its bin (``ceil(t / w) * w``, e.g. weeks) and **suppresses small cells**
(:func:`release_times`): per group, patients leaving the risk set are carried forward to later bins until
at least ``min_cell`` (the site's ``min_cohort``) leave together, and a remainder at the end of follow-up
joins the last released cell; a group with fewer than ``min_cell`` patients at a site is left out
(listed in the reply's ``suppressed_groups``). Every time in such a reply is a bin edge shared by at least
``min_cell`` of the site's patients of that group. What changes: the timeline (bin edges only), the
survival values and intervals, medians and the log-rank statistic (patients are counted at risk until
their cell is released); what does not: the number of patients and events per group (unless a group is
suppressed). The federated result then equals lifelines on the pooled *released* data.

The round over a site's cohort is in :mod:`common.outcomes_site`, the driver is
:func:`common.outcomes.run_survival`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from common.errors import ProtocolError
from common.noise import GaussianNoise
from common.pooled_moments import require_cohort
from common.protocol import Payload

log = logging.getLogger(__name__)
EXACT = "exact"
BINNED = "binned"


def check_survival_data(site_id: str, durations: Any, events: Any,
                        groups: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Durations (finite, >= 0), events (0/1) and group labels as arrays, or a :class:`ProtocolError`.

    The message names the site and counts the bad values; it never holds a patient's time.
    """
    try:
        t = np.asarray(pd.to_numeric(pd.Series(np.asarray(durations).ravel()), errors="coerce"), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(site_id, f"durations are not numbers ({exc})", "give durations in days") from exc
    e_raw = pd.to_numeric(pd.Series(np.asarray(events).ravel()), errors="coerce").to_numpy(dtype=np.float64)
    if t.size == 0:
        raise ProtocolError(site_id, "no patient with durations", "give each patient a duration and an event flag")
    if e_raw.size != t.size:
        raise ProtocolError(site_id, f"{t.size} durations but {e_raw.size} event flags",
                            "give one event flag per patient")
    bad = int(np.count_nonzero(~np.isfinite(t)))
    if bad:
        raise ProtocolError(site_id, f"durations hold {bad} missing/non-numeric/infinite value(s)",
                            "fill os_days for every patient or remove the patients from the analysis")
    neg = int(np.count_nonzero(t < 0))
    if neg:
        raise ProtocolError(site_id, f"durations hold {neg} negative value(s)",
                            "durations are days from diagnosis to event or last follow-up; correct the dates")
    odd = sorted({str(v) for v in e_raw if not (v == 0.0 or v == 1.0)})
    if odd:
        raise ProtocolError(site_id, f"events must be 0 (censored) or 1 (event); found {odd[:5]}",
                            "code os_event as 0/1 for every patient")
    if groups is None:
        g = np.zeros(t.size, dtype=np.int64)
    else:
        g = np.asarray(groups).ravel()
        if g.size != t.size:
            raise ProtocolError(site_id, f"{t.size} durations but {g.size} group labels", "give one group per patient")
        if pd.isna(pd.Series(g)).any():
            raise ProtocolError(site_id, f"{int(pd.isna(pd.Series(g)).sum())} missing group label(s)",
                                "give every patient a group (cluster) label")
    return t, e_raw.astype(np.int64), g


def bin_times(durations: np.ndarray, width: float) -> np.ndarray:
    """Each time moved up to the end of its bin of ``width`` days (0 stays 0)."""
    if width <= 0:
        raise ProtocolError("(study)", f"time bin width {width} is not positive", "set outcomes.time_bin_days > 0")
    return np.ceil(np.asarray(durations, dtype=np.float64) / width) * width


def release_times(durations: np.ndarray, groups: np.ndarray, min_cell: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Small-cell suppression: the time each patient is reported at, who is kept, and the suppressed groups.

    Per group, in time order, patients leaving the risk set are held back until at least ``min_cell``
    have accumulated, and are then all reported at the current time; a remainder below ``min_cell`` at
    the end joins the last released cell (reported at its time). Groups with fewer than ``min_cell``
    patients are dropped (``keep`` False). ``min_cell <= 1`` changes nothing.
    """
    t = np.asarray(durations, dtype=np.float64)
    out = t.copy()
    keep = np.ones(t.size, dtype=bool)
    suppressed: list = []
    if min_cell <= 1:
        return out, keep, suppressed
    for label in _sorted_labels(np.unique(groups)):
        idx = np.flatnonzero(groups == label)
        if idx.size < min_cell:
            keep[idx] = False
            suppressed.append(_plain(label))
            continue
        idx = idx[np.argsort(t[idx], kind="stable")]
        cells: list[tuple[float, list[int]]] = []
        pending: list[int] = []
        for time in np.unique(t[idx]):
            pending.extend(idx[t[idx] == time].tolist())
            if len(pending) >= min_cell:
                cells.append((float(time), pending))
                pending = []
        if pending:
            cells[-1][1].extend(pending)
        for time, members in cells:
            out[members] = time
    return out, keep, suppressed


@dataclass(frozen=True)
class SurvivalTable:
    """Per group and time: patients leaving the risk set (events + censorings) and events."""

    groups: tuple  # sorted group labels
    times: np.ndarray  # (T,) sorted distinct times
    removed: np.ndarray  # (G, T)
    observed: np.ndarray  # (G, T)

    def pooled(self) -> SurvivalTable:
        """All groups as one."""
        return SurvivalTable(("all",), self.times, self.removed.sum(0, keepdims=True),
                             self.observed.sum(0, keepdims=True))

    def group(self, label: Any) -> SurvivalTable:
        """One group's rows, at the times where it has patients leaving."""
        if label not in self.groups:
            raise ProtocolError("(pooled)", f"no group {label!r} in the survival table (groups: {list(self.groups)})")
        j = self.groups.index(label)
        keep = self.removed[j] > 0
        return SurvivalTable((label,), self.times[keep], self.removed[j:j + 1, keep], self.observed[j:j + 1, keep])

    @property
    def n(self) -> np.ndarray:
        """Patients per group."""
        return self.removed.sum(axis=1)

    @property
    def events(self) -> np.ndarray:
        """Events per group."""
        return self.observed.sum(axis=1)

    def at_risk(self) -> np.ndarray:
        """(G, T) patients at risk just before each time."""
        return self.n[:, None] - np.cumsum(self.removed, axis=1) + self.removed


def table_from_data(durations: np.ndarray, events: np.ndarray, groups: np.ndarray) -> SurvivalTable:
    """The event table of (validated) patient-level data."""
    labels = tuple(_sorted_labels(np.unique(groups)))
    times = np.unique(durations)
    removed = np.zeros((len(labels), times.size))
    observed = np.zeros((len(labels), times.size))
    pos = np.searchsorted(times, durations)
    for j, label in enumerate(labels):
        sel = groups == label
        removed[j] = np.bincount(pos[sel], minlength=times.size)
        observed[j] = np.bincount(pos[sel], weights=events[sel].astype(np.float64), minlength=times.size)
    return SurvivalTable(tuple(_plain(x) for x in labels), times, removed, observed)


@dataclass(frozen=True)
class Released:
    """A site's data as it may leave in aggregates: the kept patients' (released) times, events and groups."""

    times: np.ndarray
    events: np.ndarray
    groups: np.ndarray
    keep: np.ndarray  # (n_input,) which input rows are kept
    suppressed_groups: list


def released_data(site_id: str, durations: Any, events: Any, groups: Any = None, *, min_cohort: int = 1,
                  time_bin_days: float | None = None, min_cell: int = 1) -> Released:
    """A site's validated data as it may be released: times binned and small cells merged, small groups out.

    Exact when ``time_bin_days`` is None and ``min_cell <= 1``; merging cells (``min_cell > 1``) needs bins.
    """
    t, e, g = check_survival_data(site_id, durations, events, groups)
    require_cohort(site_id, t.size, min_cohort)
    if min_cell > 1 and not time_bin_days:
        raise ProtocolError(site_id, "small cells are merged only on binned times (a merged cell released at an "
                            "exact time would show its last patient's time)", "set a time bin (outcomes.time_bin_days)")
    if time_bin_days:
        t = bin_times(t, time_bin_days)
    t, keep, suppressed = release_times(t, g, min_cell)
    if suppressed:
        log.info("site %s: group(s) %s hold fewer than %d patients; left out", site_id, suppressed, min_cell)
    if not keep.any():
        raise ProtocolError(site_id, f"every group holds fewer than {min_cell} patients; nothing can be released",
                            "use fewer groups or a site policy that allows small cells")
    return Released(t[keep], e[keep], g[keep], keep, suppressed)


def site_survival_table(site_id: str, durations: Any, events: Any, groups: Any = None, *, min_cohort: int = 1,
                        time_bin_days: float | None = None, min_cell: int = 1) -> Payload:
    """The site step: the site's per-group event table (exact, or binned with small cells suppressed)."""
    rel = released_data(site_id, durations, events, groups, min_cohort=min_cohort, time_bin_days=time_bin_days,
                        min_cell=min_cell)
    return survival_table_payload(rel, time_bin_days, min_cell)


def survival_table_payload(rel: Released, time_bin_days: float | None, min_cell: int) -> Payload:
    """The reply of :func:`site_survival_table` for already released data."""
    table = table_from_data(rel.times, rel.events, rel.groups)
    return {
        "mode": BINNED if time_bin_days else EXACT,
        "time_bin_days": float(time_bin_days or 0.0),
        "min_cell": int(min_cell),
        "group_labels": list(table.groups),
        "times": table.times,
        "removed": table.removed,
        "observed": table.observed,
        "suppressed_groups": list(rel.suppressed_groups),
        "n": int(rel.times.size),
    }


@dataclass(frozen=True)
class NoisyRelease(GaussianNoise):
    """How a site adds noise to its event table: the Gaussian mechanism on a fixed, coarse time grid.

    One patient adds 1 to one ``removed`` cell and at most 1 to the same ``observed`` cell (L2 sensitivity
    sqrt(2)). The grid (``bins`` cells up to ``horizon_days``, each a multiple of the bin width) and the groups
    (every group of the study, empty or not) do not depend on the data, and the grid is coarse because every
    cell pays the same noise. The noisy counts leave as they are (unbiased; ``n`` is their sum); the server sums
    the sites' and makes the pooled table consistent (:func:`consistent_counts`), which is post-processing.
    """

    horizon_days: float = 3650.0
    bins: int = 12
    groups: tuple = ()  # every group the study has (k-means: 0..k-1), each answered even when empty; () = seen


def noisy_table_payload(site_id: str, durations: Any, events: Any, groups: Any, time_bin_days: float,
                        noisy: NoisyRelease, min_cohort: int = 1) -> Payload:
    """The site step in noisy mode: the event table on a fixed grid, with calibrated Gaussian noise."""
    t, e, g = check_survival_data(site_id, durations, events, groups)
    require_cohort(site_id, t.size, min_cohort)
    width = time_bin_days * max(1.0, np.ceil(noisy.horizon_days / noisy.bins / time_bin_days - 1e-9))
    horizon = width * noisy.bins
    late = t > horizon
    t, e = np.where(late, horizon, t), np.where(late, 0, e)  # followed beyond the grid: censored at its end
    grid = width * np.arange(1, noisy.bins + 1, dtype=np.float64)
    labels = tuple(_sorted_labels(noisy.groups or np.unique(g)))
    if not set(_plain(x) for x in np.unique(g)) <= set(labels):
        raise ProtocolError(site_id, "a patient's group is not one of the study's groups",
                            "label the patients with the study's k-means clusters")
    pos = np.clip(np.searchsorted(grid, t, side="left"), 0, grid.size - 1)  # bin (k-1)w < t <= kw
    removed = np.zeros((len(labels), grid.size))
    observed = np.zeros((len(labels), grid.size))
    for j, label in enumerate(labels):
        sel = g == label
        removed[j] = np.bincount(pos[sel], minlength=grid.size)
        observed[j] = np.bincount(pos[sel], weights=e[sel].astype(np.float64), minlength=grid.size)
    noisy.charge()
    removed, observed = noisy.add(removed, np.sqrt(2.0)), noisy.add(observed, np.sqrt(2.0))
    return {"mode": BINNED, "time_bin_days": float(width), "min_cell": 1, "noise_sd": noisy.sd(np.sqrt(2.0)),
            "group_labels": [_plain(x) for x in labels], "times": grid, "removed": removed, "observed": observed,
            "suppressed_groups": [], "n": int(max(round(float(removed.sum())), 0))}  # post-processing of removed


def consistent_counts(table: SurvivalTable) -> SurvivalTable:
    """A pooled noisy table made a table of counts: removed rounded and >= 0, 0 <= observed <= removed."""
    removed = np.maximum(np.round(table.removed), 0.0)
    observed = np.clip(np.round(table.observed), 0.0, removed)
    used = removed.sum(axis=0) > 0  # a time nobody leaves at is no time of the table
    return SurvivalTable(table.groups, table.times[used], removed[:, used], observed[:, used])


def merge_survival_tables(replies: Mapping[str, Mapping[str, object]]) -> SurvivalTable:
    """The server step: the pooled event table, after checking every reply."""
    if not replies:
        raise ProtocolError("(none)", "no site sent a survival table")
    noisy = any(float(replies[site].get("noise_sd", 0.0)) > 0 for site in replies)  # type: ignore[arg-type]
    parsed = {site: _parse_table(site, replies[site], noisy) for site in sorted(replies)}
    modes = {site: (str(replies[site].get("mode")), float(replies[site].get("time_bin_days", 0.0)))  # type: ignore[arg-type]
             for site in parsed}
    first = next(iter(modes))
    for site, mode in modes.items():
        if mode != modes[first]:
            raise ProtocolError(site, f"answered in mode {mode}, site {first!r} in {modes[first]}",
                                "send one study config (outcomes.time_bin_days) to every site")
    labels = tuple(_sorted_labels({x for tab in parsed.values() for x in tab.groups}))
    times = np.unique(np.concatenate([tab.times for tab in parsed.values()]))
    removed = np.zeros((len(labels), times.size))
    observed = np.zeros((len(labels), times.size))
    for tab in parsed.values():
        cols = np.searchsorted(times, tab.times)
        for j, label in enumerate(tab.groups):
            row = labels.index(label)
            removed[row, cols] += tab.removed[j]
            observed[row, cols] += tab.observed[j]
    pooled = SurvivalTable(labels, times, removed, observed)
    return consistent_counts(pooled) if noisy else pooled


def _parse_table(site: str, reply: Mapping[str, object], noisy: bool = False) -> SurvivalTable:
    try:
        groups = tuple(_plain(x) for x in reply["group_labels"])  # type: ignore[attr-defined]
        times = np.atleast_1d(np.asarray(reply["times"], dtype=np.float64))
        removed = np.atleast_2d(np.asarray(reply["removed"], dtype=np.float64))
        observed = np.atleast_2d(np.asarray(reply["observed"], dtype=np.float64))
    except (KeyError, TypeError) as exc:
        raise ProtocolError(site, f"survival reply lacks or garbles {exc}",
                            "run the same fedbiopsy version at every site") from exc
    shape = (len(groups), times.size)
    problems = []
    if removed.shape != shape or observed.shape != shape:
        problems.append(f"counts of shape {removed.shape}/{observed.shape}, expected {shape}")
    elif not (np.all(np.isfinite(times)) and np.all(times >= 0) and np.all(np.diff(times) > 0)):
        problems.append("times are not sorted distinct non-negative numbers")
    elif noisy and not (np.all(np.isfinite(removed)) and np.all(np.isfinite(observed))):
        problems.append("noisy counts are not finite")
    elif not noisy and (np.any(removed < 0) or np.any(observed < 0) or np.any(observed > removed)
                        or np.any(removed != np.round(removed)) or np.any(observed != np.round(observed))):
        problems.append("counts are not integers with 0 <= events <= patients leaving")
    elif len(set(groups)) != len(groups):
        problems.append("group labels repeat")
    if problems:
        raise ProtocolError(site, "invalid survival table: " + problems[0],
                            "run the same fedbiopsy version at every site")
    return SurvivalTable(groups, times, removed, observed)


def kaplan_meier(table: SurvivalTable, group: Any = None, alpha: float = 0.05) -> pd.DataFrame:
    """Kaplan-Meier survival with lifelines' exponential-Greenwood interval, as ``KaplanMeierFitter`` computes it.

    ``group`` None: all groups pooled. Index ``timeline`` (0 and every time with patients leaving);
    columns ``survival``, ``ci_lower``, ``ci_upper``, ``at_risk``, ``observed``, ``censored``.
    """
    from scipy import stats

    tab = table.pooled() if group is None else table.group(group)
    removed, observed, times = tab.removed[0], tab.observed[0], tab.times
    if times.size == 0 or times[0] > 0:  # lifelines' birth row at time 0
        times = np.r_[0.0, times]
        removed = np.r_[0.0, removed]
        observed = np.r_[0.0, observed]
    at_risk = removed.sum() - np.r_[0.0, np.cumsum(removed)[:-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s = np.cumsum(np.log(at_risk - observed) - np.log(at_risk))
        denom = at_risk * (at_risk - observed)
        var = np.cumsum(np.where(denom == 0, 0.0, observed / np.where(denom == 0, 1.0, denom)))
        survival = np.exp(log_s)
        z = stats.norm.ppf(1 - alpha / 2)
        v = np.log(survival)
        lower = np.exp(-np.exp(np.log(-v) - z * np.sqrt(var) / v))
        upper = np.exp(-np.exp(np.log(-v) + z * np.sqrt(var) / v))
    index = pd.Index(times, name="timeline")
    return pd.DataFrame({
        "survival": survival,
        "ci_lower": np.nan_to_num(lower, nan=1.0),
        "ci_upper": np.nan_to_num(upper, nan=1.0),
        "at_risk": at_risk,
        "observed": observed,
        "censored": removed - observed,
    }, index=index)


def median_survival(km: pd.DataFrame) -> float:
    """The first time where survival is at or below 0.5 (lifelines' rule); inf when never reached."""
    below = km.index[km["survival"].to_numpy() <= 0.5]
    return float(below[0]) if len(below) else float("inf")


@dataclass(frozen=True)
class LogRankResult:
    """The log-rank test (lifelines' ``multivariate_logrank_test``) of two or more groups."""

    test_statistic: float
    p_value: float
    degrees_of_freedom: int
    groups: tuple
    observed: np.ndarray  # events per group
    expected: np.ndarray  # expected events per group under the null

    def as_dict(self) -> dict:
        return {"test_statistic": self.test_statistic, "p_value": self.p_value,
                "degrees_of_freedom": self.degrees_of_freedom, "groups": [_plain(g) for g in self.groups],
                "observed": self.observed.tolist(), "expected": self.expected.tolist()}


def logrank_test(table: SurvivalTable) -> LogRankResult:
    """The log-rank chi-square over the table's groups (at least two), as lifelines computes it."""
    from scipy import stats

    g = len(table.groups)
    if g < 2:
        raise ProtocolError("(pooled)", f"the log-rank test needs two or more groups, got {g}",
                            "cluster into k >= 2 groups or pass group labels")
    n_ij = table.at_risk().T  # (T, G)
    d_ij = table.observed.T
    d_i = d_ij.sum(axis=1)
    n_i = n_ij.sum(axis=1)
    expected = n_ij * (d_i / n_i)[:, None]
    z = d_ij.sum(axis=0) - expected.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (n_i - d_i) / (n_i - 1)
    factor = np.where(np.isfinite(ratio), ratio, 1.0) * d_i / n_i**2
    v = np.einsum("t,tj,t->j", factor, n_ij, n_i)
    cov = np.diag(v) - np.einsum("t,tj,tk->jk", factor, n_ij, n_ij)
    stat = float(z[:-1] @ np.linalg.pinv(cov[:-1, :-1]) @ z[:-1])
    return LogRankResult(test_statistic=stat, p_value=float(stats.chi2.sf(stat, g - 1)), degrees_of_freedom=g - 1,
                         groups=table.groups, observed=d_ij.sum(axis=0), expected=expected.sum(axis=0))


def _plain(x: Any) -> Any:
    """A numpy scalar as the Python value (labels travel in config records and JSON)."""
    return x.item() if isinstance(x, np.generic) else x


def _sorted_labels(labels: Sequence | set | np.ndarray) -> list:
    items = [_plain(x) for x in labels]
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=str)
