"""Site side of the outcomes protocols (k-means, Kaplan-Meier / log-rank, Cox): one function per query action.

A site's :class:`OutcomesCohort` holds what never leaves it: the feature matrix it clusters on, its
patients' durations and events, their cluster labels once k-means has given them, and the policy that
limits its replies. Each function of :data:`OUTCOMES_STEPS` answers one round with aggregates only; the
drivers of :mod:`common.outcomes` send the rounds through a query. ``client/steps/outcomes.py`` loads the
cohort from the site's files; tests build it from arrays (:func:`cohort_from_arrays`,
:func:`cohorts_from_frames`).

====================  =============================================================================
action                the site answers
====================  =============================================================================
kmeans_moments        per-feature count, mean and centred SS; feature names, their source, exact flag
kmeans_local_centres  up to ``n_centres`` local centroids, each of >= ``min_cell`` patients (k-means++)
kmeans_assign         per-cluster sums and counts for the sent centres (one Lloyd iteration)
kmeans_labels         the patients' count and inertia; the labels themselves stay at the site
survival_table        per-group event table, exact or binned with small cells merged
cox_moments           covariate moments and names, the separation summary, its released event times
cox_sums              risk-set and tie sums at the pooled event times for one beta
====================  =============================================================================

Policy: ``min_cohort`` (the site refuses with fewer patients), ``min_cell`` (cluster cells, survival cells
and, for Cox on covariate columns, tie groups smaller than this are withheld, merged or refused; 1 where
the policy allows exact outcomes) and ``exact`` (exact event times may be sent). Cox on group indicators
(the request's ``groups``: cluster membership) needs no tie rule: its sums are functions of the per-group
event table that :func:`site_event_table` already releases.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.cox import site_cox_summary, site_cox_sums, site_event_times
from common.errors import PolicyError, ProtocolError
from common.kmeans import NoisyKMeans, assign_labels, inertia, noisy_cluster_sums, site_cluster_sums, site_local_centres
from common.pooled_moments import check_matrix, require_cohort, site_moments
from common.protocol import Payload, SiteFunction
from common.release_ledger import FEATURES, SURVIVAL, ReleaseLedger, digest_id, partition
from common.survival import (
    EXACT,
    NoisyRelease,
    Released,
    noisy_table_payload,
    released_data,
    survival_table_payload,
)

KMEANS_MOMENTS, KMEANS_LOCAL_CENTRES, KMEANS_ASSIGN, KMEANS_LABELS = (
    "kmeans_moments", "kmeans_local_centres", "kmeans_assign", "kmeans_labels")
SURVIVAL_TABLE, COX_MOMENTS, COX_SUMS = "survival_table", "cox_moments", "cox_sums"
KMEANS_ACTIONS: tuple[str, ...] = (KMEANS_MOMENTS, KMEANS_LOCAL_CENTRES, KMEANS_ASSIGN, KMEANS_LABELS)
SURVIVAL_ACTIONS: tuple[str, ...] = (SURVIVAL_TABLE, COX_MOMENTS, COX_SUMS)


@dataclass
class OutcomesCohort:
    """One site's data for the outcomes protocols (stays at the site) and the policy limiting its replies.

    ``durations``, ``events``, ``labels`` and ``covariates`` share their rows (the survival cohort); after
    the k-means labels round ``labels`` holds one label per row of ``features``. ``label_sink`` is where
    else the labels are kept (the client writes ``derived/clusters.csv``).
    """

    site_id: str
    features: np.ndarray | None = None  # patients x features to cluster on
    feature_names: tuple[str, ...] = ()
    source: str = "memory"  # where the features came from (a file name at a site)
    durations: np.ndarray | None = None
    events: np.ndarray | None = None
    labels: np.ndarray | None = None  # group (cluster) per patient; None: all patients one group
    covariates: np.ndarray | None = None  # Cox covariate columns (when the request names no groups)
    covariate_names: tuple[str, ...] = ()
    min_cohort: int = 1
    min_cell: int = 1
    exact: bool = True  # the policy allows exact event times (and cells under min_cohort)
    survival_source: str = ""  # named in errors about the survival data, e.g. "clinical.csv os_days/os_event"
    label_sink: Callable[[np.ndarray], None] | None = None
    ids: tuple[str, ...] = ()  # patient ids of the rows of ``features`` (for the release ledger)
    survival_ids: tuple[str, ...] = ()  # patient ids of the survival rows
    ledger: ReleaseLedger | None = None  # None: no differencing rule (exact policy, in-memory parity tests)
    time_floor: float | None = None  # the finest time bin the site releases; coarser requests are multiples
    noisy: NoisyRelease | None = None  # set: event tables leave with calibrated noise (no merging, no ledger)
    study_key: str = ""  # the study the requests come from (a ledger scope freezes per study)
    noisy_kmeans: NoisyKMeans | None = None  # set (with a ledger, which keeps its round count): noisy Lloyd answers

    def keep_labels(self, labels: np.ndarray) -> None:
        """Keep the patients' cluster labels here (and in :attr:`label_sink`)."""
        self.labels = np.asarray(labels)
        if self.label_sink is not None:
            self.label_sink(self.labels)


def cohort_from_arrays(site_id: str, features: np.ndarray | None = None, durations: object = None,
                       events: object = None, groups: object = None, *, feature_names: Sequence[str] = (),
                       min_cohort: int = 1, min_cell: int = 1, exact: bool | None = None) -> OutcomesCohort:
    """A cohort from per-site arrays (features unnamed: ``feature_0``, ...); ``exact`` defaults to ``min_cell <= 1``."""
    x = None if features is None else np.asarray(features, dtype=np.float64)
    names = tuple(feature_names)
    if x is not None and not names:
        names = tuple(f"feature_{j}" for j in range(x.shape[1] if x.ndim == 2 else 0))

    def arr(value: object) -> np.ndarray | None:
        return None if value is None else np.asarray(value).ravel()

    return OutcomesCohort(site_id, features=x, feature_names=names, durations=arr(durations), events=arr(events),
                          labels=arr(groups), min_cohort=min_cohort, min_cell=min_cell,
                          exact=min_cell <= 1 if exact is None else exact)


def cohorts_from_frames(frames: Mapping[str, pd.DataFrame], duration_col: str, event_col: str, *,
                        min_cohort: int = 1, min_cell: int = 1) -> dict[str, OutcomesCohort]:
    """Cox cohorts: every column other than ``duration_col``/``event_col`` of a site's frame is a covariate."""
    out = {}
    for site in sorted(frames):
        frame = frames[site]
        for col in (duration_col, event_col):
            if col not in frame.columns:
                raise ProtocolError(site, f"no column {col!r}", f"name the duration and event columns ({list(frame)})")
        cov = frame.drop(columns=[duration_col, event_col])
        non_numeric = [c for c in cov.columns if not pd.api.types.is_numeric_dtype(cov[c])]
        if non_numeric:
            raise ProtocolError(site, f"covariate(s) {non_numeric} are not numeric", "encode them as numbers")
        cohort = cohort_from_arrays(site, durations=frame[duration_col], events=frame[event_col],
                                    min_cohort=min_cohort, min_cell=min_cell)
        cohort.covariates = cov.to_numpy(dtype=np.float64)
        cohort.covariate_names = tuple(str(c) for c in cov.columns)
        out[site] = cohort
    return out


# ============================================================================================ helpers


def _array(request: Mapping[str, object], key: str, site: str) -> np.ndarray:
    if key not in request:
        raise ProtocolError(site, f"the request lacks {key!r}", "run the same fedbiopsy version everywhere")
    return np.asarray(request[key], dtype=np.float64)


def _features(cohort: OutcomesCohort) -> np.ndarray:
    if cohort.features is None:
        raise ProtocolError(cohort.site_id, "no feature table to cluster on", "give the site its feature table")
    return check_matrix(cohort.site_id, cohort.features)


def _standardised(cohort: OutcomesCohort, request: Mapping[str, object]) -> np.ndarray:
    x = _features(cohort)
    return (x - _array(request, "mean", cohort.site_id)) / _array(request, "scale", cohort.site_id)


def time_bin(site_id: str, exact_allowed: bool, request: Mapping[str, object], floor: float | None = None
             ) -> float | None:
    """The bin width to release (None: exact times); refused when exact is asked and not allowed.

    With a site ``floor`` the width is the floor whatever the request asks: one fixed grid, so that no two
    releases with different edges resolve a patient's time (or isolate one patient between two edges).
    """
    if str(request.get("mode", "")) == EXACT:
        if not exact_allowed:
            raise PolicyError(site_id, "exact_outcomes", "exact event times were requested; this site allows "
                              "only binned times with small cells merged")
        return None
    if "time_bin_days" not in request:
        raise ProtocolError(site_id, "the request asks for binned times but gives no bin width",
                            "run the same fedbiopsy version everywhere")
    width = float(request["time_bin_days"])  # type: ignore[arg-type]
    if not math.isfinite(width) or width <= 0:
        raise ProtocolError(site_id, "the time bin width is not a positive number", "set outcomes.time_bin_days > 0")
    return width if floor is None else float(floor)


def released(cohort: OutcomesCohort, request: Mapping[str, object]) -> Released:
    """The cohort's survival data as the request's mode and the site's policy let it leave."""
    width = time_bin(cohort.site_id, cohort.exact, request, cohort.time_floor)
    if cohort.durations is None or cohort.events is None:
        raise ProtocolError(cohort.site_id, "no survival data (durations and events)",
                            "give the site its patients' durations and event flags")
    try:
        rel = released_data(cohort.site_id, cohort.durations, cohort.events, cohort.labels,
                            min_cohort=cohort.min_cohort, time_bin_days=width, min_cell=cohort.min_cell)
    except ProtocolError as err:
        if not cohort.survival_source:
            raise
        raise ProtocolError(cohort.site_id, f"{cohort.survival_source}: {err.problem}",
                            f"correct {cohort.survival_source}") from err
    if cohort.ledger is not None:  # the groups, against every grouping of these patients released before
        all_ids = cohort_ids(cohort.site_id, cohort.survival_ids, cohort.durations.size)
        ids = [all_ids[i] for i in np.flatnonzero(rel.keep)]
        cohort.ledger.release(SURVIVAL, ids, partition(ids, rel.groups), cohort.study_key)
    return rel


def cohort_ids(site_id: str, ids: Sequence[str], n: int) -> list[str]:
    """The patient ids of ``n`` rows, or a :class:`ProtocolError` when the cohort was built without them."""
    if len(ids) != n:
        raise ProtocolError(site_id, f"{len(ids)} patient ids for {n} rows", "build the cohort with its patient ids")
    return list(ids)


def _cox_covariates(cohort: OutcomesCohort, rel: Released, request: Mapping[str, object]) -> np.ndarray:
    if "groups" in request:  # indicators of every group but the first (the reference)
        groups = list(request["groups"])  # type: ignore[call-overload]
        if len(groups) < 2:
            raise ProtocolError(cohort.site_id, "Cox on groups needs at least two groups", "send the pooled groups")
        return np.stack([(rel.groups == g).astype(np.float64) for g in groups[1:]], axis=1)
    if cohort.covariates is None:
        raise ProtocolError(cohort.site_id, "no Cox covariates at this site", "give the site its covariate columns")
    return check_matrix(cohort.site_id, cohort.covariates, "covariate matrix")[rel.keep]


# ============================================================================================ site steps


def site_kmeans_moments(cohort: OutcomesCohort, request: Mapping[str, object]) -> Payload:
    """Round 1 of k-means: feature moments (standardisation, tolerance), names, source and the exact flag."""
    out = site_moments(cohort.site_id, _features(cohort), cohort.min_cohort)
    if cohort.ledger is not None:
        ids = cohort_ids(cohort.site_id, cohort.ids, _features(cohort).shape[0])
        cohort.ledger.release(FEATURES, ids, [ids], cohort.study_key)
    out.update(features=list(cohort.feature_names), source=cohort.source, exact_outcomes=bool(cohort.exact))
    return out


def site_kmeans_local_centres(cohort: OutcomesCohort, request: Mapping[str, object]) -> Payload:
    """Federated k-means++: local centroids of the standardised features (seeded per site).

    Under a release ledger the site sends no local partition (trying one would itself answer which partitions
    single out a few patients): two pseudo-centroids ``mean +/- sd`` of its standardised features, half of its
    cohort each, a function of the moments it already released -- so the server's k-means++ still spreads
    its seeds over the data rather than putting one on each site.
    """
    seed = (int(request.get("seed", 0)) + zlib.crc32(cohort.site_id.encode())) % 2**31  # type: ignore[call-overload]
    z = _standardised(cohort, request)
    if cohort.ledger is None:
        n_centres = int(_array(request, "n_centres", cohort.site_id))
        return site_local_centres(cohort.site_id, z, n_centres, cohort.min_cell, seed, cohort.min_cohort)
    require_cohort(cohort.site_id, z.shape[0], cohort.min_cohort)
    mean, sd = z.mean(axis=0), z.std(axis=0)
    return {"centres": np.stack([mean - sd, mean + sd]), "counts": np.full(2, z.shape[0] / 2.0)}


def _assign_key(cohort: OutcomesCohort, k: int) -> str:
    return f"assign-k{k}|{cohort.study_key}"


def site_kmeans_assign(cohort: OutcomesCohort, request: Mapping[str, object]) -> Payload:
    """One Lloyd iteration: per-cluster sums and counts (cells under ``min_cell`` withheld).

    Under a release ledger a partition that may not leave (a cell, its complement or its difference from an
    earlier released cell under ``min_cell`` patients) is not answered, and freezes the site's k-means for the
    study (:class:`~common.release_ledger.ReleaseLedger`): from then on the site repeats its last released
    answer of the study (zeros before the first) with ``held`` = 1 and ``changed`` = 0. ``changed`` is whether
    the partition differs from the last released one (0/1), never a count of server-chosen regions.
    """
    previous = request.get("previous")
    z = _standardised(cohort, request)
    centres = _array(request, "centres", cohort.site_id)
    if cohort.noisy_kmeans is not None:
        return _noisy_assign(cohort, z, centres, cohort.noisy_kmeans)
    out = site_cluster_sums(cohort.site_id, z, centres, None if previous is None else np.asarray(previous, np.float64),
                            cohort.min_cell, cohort.min_cohort)
    if cohort.ledger is None:
        return out
    ledger, ids = cohort.ledger, cohort_ids(cohort.site_id, cohort.ids, z.shape[0])
    key = _assign_key(cohort, centres.shape[0])
    last = ledger.last(FEATURES, key)
    labels = assign_labels(z, centres)
    cells = [[ids[i] for i in np.flatnonzero(labels == j)] for j in range(centres.shape[0])]
    if not ledger.try_release(FEATURES, ids, cells, cohort.study_key):
        sums = np.asarray(last["sums"]) if last else np.zeros_like(out["sums"])
        counts = np.asarray(last["counts"]) if last else np.zeros_like(out["counts"])
        return {"sums": sums, "counts": counts, "changed": 0, "suppressed": 0, "held": 1, "n": out["n"]}
    digest = [sorted(digest_id(p) for p in c) for c in cells]
    out["changed"] = int(last is None or last.get("cells") != digest)
    ledger.keep(FEATURES, key, {"sums": out["sums"], "counts": out["counts"], "cells": digest})
    out["held"] = 0
    return out


def _noisy_assign(cohort: OutcomesCohort, z: np.ndarray, centres: np.ndarray, noise: NoisyKMeans) -> Payload:
    """A noisy Lloyd answer, or past the study's ``noise.rounds`` the last one again (``held`` = 1, no charge)."""
    if cohort.ledger is None:
        raise ProtocolError(cohort.site_id, "noisy k-means needs the site's release ledger (its round count)",
                            "give the cohort a ReleaseLedger")
    key = f"noisy-assign|{cohort.study_key}"  # one count a study, whatever the k asked
    state = cohort.ledger.last(FEATURES, key)
    if state and int(state["rounds"]) >= noise.rounds:
        return {"sums": np.asarray(state["sums"]), "counts": np.asarray(state["counts"]), "changed": 0,
                "suppressed": 0, "n": int(state["n"]), "noise_sd": float(state["noise_sd"]), "held": 1}
    out = noisy_cluster_sums(cohort.site_id, z, centres, noise, cohort.min_cohort)
    cohort.ledger.keep(FEATURES, key, {**out, "rounds": (int(state["rounds"]) if state else 0) + 1})
    out["held"] = 0
    return out


def site_kmeans_labels(cohort: OutcomesCohort, request: Mapping[str, object]) -> Payload:
    """The final centres: the site labels its patients and keeps the labels; only count and inertia leave.

    Under a release ledger a study gets one labels round (another is refused, rule ``release_ledger``; the same
    one again, e.g. a rerun of the study, is answered), the inertia
    leaves only when the final partition may, and a partition that may not counts as a refusal of the study.
    The labels stay at the site either way: the survival steps drop groups under ``min_cell`` and hold their
    own groupings to the ledger's ``survival`` scope.
    """
    z = _standardised(cohort, request)
    require_cohort(cohort.site_id, z.shape[0], cohort.min_cohort)
    centres = _array(request, "centres", cohort.site_id)
    labels = assign_labels(z, centres)
    out: Payload = {"n": int(labels.size)}
    ledger = cohort.ledger
    if ledger is not None:
        asked = hashlib.sha256(np.ascontiguousarray(np.concatenate([
            centres.ravel(), _array(request, "mean", cohort.site_id), _array(request, "scale", cohort.site_id)])
        ).tobytes()).hexdigest()
        if ledger.closed(FEATURES) or not ledger.once(FEATURES, cohort.study_key, "kmeans_labels", asked):
            raise PolicyError(cohort.site_id, "release_ledger", "one k-means labels round a study (or the scope "
                              "is closed)")
        ids = cohort_ids(cohort.site_id, cohort.ids, z.shape[0])
        releasable = cohort.noisy_kmeans is None and not ledger.frozen(FEATURES, cohort.study_key) and \
            ledger.try_release(FEATURES, ids, partition(ids, labels), cohort.study_key)
        cohort.keep_labels(labels)
        if not releasable:
            out["held"] = 1
            return out
    elif cohort.noisy_kmeans is not None:
        cohort.keep_labels(labels)
        out["held"] = 1
        return out
    else:
        cohort.keep_labels(labels)
    out["inertia"] = inertia(z, centres, labels)
    return out


def site_event_table(cohort: OutcomesCohort, request: Mapping[str, object]) -> Payload:
    """The per-group event table of the released data (see :func:`common.survival.site_survival_table`)."""
    width = time_bin(cohort.site_id, cohort.exact, request, cohort.time_floor)
    if cohort.noisy is not None and width is not None:
        if cohort.durations is None or cohort.events is None:
            raise ProtocolError(cohort.site_id, "no survival data (durations and events)",
                                "give the site its patients' durations and event flags")
        groups = np.zeros(cohort.durations.size, np.int64) if cohort.labels is None else cohort.labels
        return noisy_table_payload(cohort.site_id, cohort.durations, cohort.events, groups, width, cohort.noisy,
                                   cohort.min_cohort)
    return survival_table_payload(released(cohort, request), width, cohort.min_cell)


def site_cox_moments(cohort: OutcomesCohort, request: Mapping[str, object]) -> Payload:
    """Round 1 of Cox: covariate moments, names and separation summary, and the released event times."""
    rel = released(cohort, request)
    x = _cox_covariates(cohort, rel, request)
    out = site_moments(cohort.site_id, x, 1)
    out.update(site_cox_summary(cohort.site_id, x, rel.events))
    out["event_times"] = site_event_times(rel.times, rel.events)
    if "groups" not in request:
        out["covariates"] = list(cohort.covariate_names)
    return out


def site_cox_newton(cohort: OutcomesCohort, request: Mapping[str, object]) -> Payload:
    """One Newton step of Cox: risk-set and tie sums of the normalised covariates at the pooled event times."""
    rel = released(cohort, request)
    x = _cox_covariates(cohort, rel, request)
    min_events = 1 if "groups" in request else max(cohort.min_cell, 1)
    return site_cox_sums(cohort.site_id, x, rel.times, rel.events, _array(request, "beta", cohort.site_id),
                         _array(request, "mean", cohort.site_id), _array(request, "scale", cohort.site_id),
                         _array(request, "event_times", cohort.site_id), min_events_per_time=min_events)


OUTCOMES_STEPS: dict[str, SiteFunction] = {
    KMEANS_MOMENTS: site_kmeans_moments,
    KMEANS_LOCAL_CENTRES: site_kmeans_local_centres,
    KMEANS_ASSIGN: site_kmeans_assign,
    KMEANS_LABELS: site_kmeans_labels,
    SURVIVAL_TABLE: site_event_table,
    COX_MOMENTS: site_cox_moments,
    COX_SUMS: site_cox_newton,
}
"""The site function of every outcomes action: ``InMemoryQuery(cohorts, OUTCOMES_STEPS)``."""
