"""Site steps of the outcomes phase: k-means, survival tables and Cox sums, aggregates only.

The site clusters on its feature table (``derived/signature_scores.csv``, else ``features_harmonised.csv``,
else ``features.csv``: rows ``patient_id``, numeric columns) and keeps the cluster labels in
``derived/clusters.csv``; survival comes from ``clinical.csv`` (``os_days``/``os_event`` by default).
The site's policy decides how exact a reply may be: with ``exact_outcomes`` false (the default) cluster
cells and survival cells under ``min_cohort`` are withheld or merged and times are binned.

One step per action of :mod:`common.outcomes_site`: each loads the site's data into an
:class:`~common.outcomes_site.OutcomesCohort` and calls the same site function as the in-memory tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd

from client.privacy_ledger import charge_gaussian
from client.steps.base import SiteStep, release_ledger, work_dir
from client.training.dp import noise_multiplier_for
from common.config import StudyConfig
from common.errors import PolicyError, SiteDataError
from common.kmeans import NoisyKMeans
from common.outcomes_site import (
    KMEANS_ACTIONS,
    OUTCOMES_STEPS,
    SURVIVAL_ACTIONS,
    SURVIVAL_TABLE,
    OutcomesCohort,
    time_bin,
)
from common.protocol import Payload
from common.sitedata import CLINICAL_COLUMNS, Site, read_clinical
from common.survival import NoisyRelease

log = logging.getLogger(__name__)
FEATURE_FILES: tuple[str, ...] = ("signature_scores.csv", "features_harmonised.csv", "features.csv")
CLUSTERS_FILE = "clusters.csv"
_NOT_FEATURES = set(CLINICAL_COLUMNS) | {"cluster", "subtype", "site_id"}


def feature_table(site: Site, study: StudyConfig) -> tuple[pd.DataFrame, str]:
    """The site's feature matrix (rows by patient_id, complete rows only) and the file it came from."""
    folder = work_dir(site)
    path = next((folder / name for name in FEATURE_FILES if (folder / name).is_file()), None)
    if path is None:
        raise SiteDataError(folder / FEATURE_FILES[0], "no feature table for the outcomes phase",
                            f"run the features/harmonisation/reduction phases first, or write one of {FEATURE_FILES} "
                            "(patient_id + numeric columns)")
    frame = pd.read_csv(path, dtype={"patient_id": str})
    frame = frame.set_index("patient_id") if "patient_id" in frame.columns else frame.set_index(frame.columns[0])
    frame.index = frame.index.astype(str)
    wanted = study.outcomes.features
    if wanted:
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise SiteDataError(path, f"missing feature column(s) {missing}", "use the study's outcomes.features")
        frame = frame[list(wanted)]
    else:
        frame = frame[[c for c in frame.columns
                       if c not in _NOT_FEATURES and pd.api.types.is_numeric_dtype(frame[c])]]
    if frame.shape[1] == 0:
        raise SiteDataError(path, "no numeric feature column", "write the features as numeric columns")
    complete = frame.notna().all(axis=1) & np.isfinite(frame.to_numpy(dtype=np.float64)).all(axis=1)
    if not complete.all():
        log.warning("site %s: %d patient(s) with missing features left out of clustering", site.site_id,
                    int((~complete).sum()))
    return frame[complete].astype(np.float64), path.name


def _policy_cohort(site: Site, study: StudyConfig, **data: object) -> OutcomesCohort:
    """A cohort limited by the site's policy: cells, time bins and, unless exact outcomes are allowed, the
    site's release ledger (``derived/release-ledger.json``) against differencing across replies."""
    policy = site.config.policy
    return OutcomesCohort(site.site_id, min_cohort=policy.min_cohort, min_cell=policy.cell_floor,
                          exact=bool(policy.exact_outcomes), ledger=release_ledger(site),
                          time_floor=policy.time_bin_days, study_key=study.hash, **data)  # type: ignore[arg-type]


def kmeans_cohort(site: Site, study: StudyConfig) -> OutcomesCohort:
    """The site's feature table as a cohort; its labels are kept in ``derived/clusters.csv``."""
    frame, source = feature_table(site, study)

    def write_labels(labels: np.ndarray) -> None:
        out_path = work_dir(site) / CLUSTERS_FILE
        pd.DataFrame({"patient_id": frame.index, "cluster": labels, "study": study.hash}).to_csv(out_path, index=False)
        log.info("site %s: cluster labels of %d patient(s) written to %s", site.site_id, labels.size, out_path)

    return _policy_cohort(site, study, features=frame.to_numpy(), feature_names=tuple(str(c) for c in frame.columns),
                          source=source, label_sink=write_labels, ids=tuple(frame.index),
                          noisy_kmeans=noisy_kmeans(site, study))


def survival_data(site: Site, study: StudyConfig) -> pd.DataFrame:
    """The site's patients with a cluster label and their survival columns (stays at the site)."""
    path = work_dir(site) / CLUSTERS_FILE
    if not path.is_file():
        raise SiteDataError(path, "no cluster labels", "run the k-means step of the outcomes phase first")
    clusters = pd.read_csv(path, dtype={"patient_id": str, "study": str}).set_index("patient_id")
    if "study" in clusters.columns:  # labels of another study's k-means are not this study's groups
        clusters = clusters[clusters["study"] == study.hash].drop(columns="study")
        if clusters.empty:
            raise SiteDataError(path, "no cluster labels of this study", "run the k-means step of this study first")
    clinical = read_clinical(site.root).set_index("patient_id")
    cfg = study.outcomes
    for col in (cfg.duration_col, cfg.event_col):
        if col not in clinical.columns:
            raise SiteDataError(site.root / "clinical.csv", f"no column {col!r}", "add it or set outcomes.*_col")
    joined = clusters.join(clinical[[cfg.duration_col, cfg.event_col]], how="inner")
    if len(joined) < len(clusters):
        log.warning("site %s: %d clustered patient(s) without a clinical row left out", site.site_id,
                    len(clusters) - len(joined))
    return joined


def _site_noise(site: Site, study: StudyConfig, model: str) -> tuple[float, Callable[[], None]] | None:
    """The site's noisy mode (``policy.noise_epsilon``): the Gaussian mechanism's noise multiplier for that
    epsilon at the site's delta (Opacus' RDP accountant, one release), and the charge that books one release in
    the site's lifetime privacy ledger under ``statistics``; None when the site releases no noisy statistics."""
    policy = site.config.policy
    if policy.noise_epsilon is None:
        return None
    sigma = noise_multiplier_for(policy.noise_epsilon, policy.max_delta, 1.0, 1)

    def charge() -> None:
        charge_gaussian(site.site_id, site.root, policy, study_hash=study.hash, noise_multiplier=sigma, model=model)

    return sigma, charge


def noisy_release(site: Site, study: StudyConfig) -> NoisyRelease | None:
    """Noisy survival tables (fresh OS randomness, never a seed the server could know), or None."""
    noise = _site_noise(site, study, "survival_table")
    if noise is None:
        return None
    return NoisyRelease(noise[0], noise[1], np.random.default_rng(), site.config.policy.time_horizon_days,
                        groups=tuple(range(study.outcomes.k)))


def noisy_kmeans(site: Site, study: StudyConfig) -> NoisyKMeans | None:
    """Noisy Lloyd answers (rows clipped to ``policy.noise_clip``; ``policy.noisy_kmeans_rounds`` a study), or None."""
    noise = _site_noise(site, study, "kmeans_assign")
    if noise is None:
        return None
    policy = site.config.policy
    return NoisyKMeans(noise[0], noise[1], np.random.default_rng(), policy.noise_clip, policy.noisy_kmeans_rounds)


def survival_cohort(site: Site, study: StudyConfig) -> OutcomesCohort:
    """The clustered patients' durations, events and labels as a cohort."""
    data = survival_data(site, study)
    cfg = study.outcomes
    return _policy_cohort(site, study, noisy=noisy_release(site, study), durations=data[cfg.duration_col].to_numpy(),
                          events=data[cfg.event_col].to_numpy(),
                          labels=data["cluster"].to_numpy(), survival_ids=tuple(data.index),
                          survival_source=f"clinical.csv {cfg.duration_col}/{cfg.event_col}")


def _kmeans_step(action: str) -> Callable[[Site, StudyConfig, Payload], Payload]:
    function = OUTCOMES_STEPS[action]

    def run(site: Site, study: StudyConfig, payload: Payload) -> Payload:
        check_centres_count(site, study, payload)
        return function(kmeans_cohort(site, study), payload)

    return run


def check_centres_count(site: Site, study: StudyConfig, payload: Payload) -> None:
    """Refuse (rule ``request_shape``), before any data is read, centres other than the study's k: more would
    label patients into groups the study does not have (an error there, or a tiny group, is an answer too)."""
    for key in ("centres", "previous"):
        if key in payload and np.atleast_2d(np.asarray(payload[key])).shape[0] != study.outcomes.k:
            raise PolicyError(site.site_id, "request_shape",
                              f"{key} hold {np.atleast_2d(np.asarray(payload[key])).shape[0]} centres, the study's "
                              f"k is {study.outcomes.k}")


def _survival_step(action: str) -> Callable[[Site, StudyConfig, Payload], Payload]:
    function = OUTCOMES_STEPS[action]

    def run(site: Site, study: StudyConfig, payload: Payload) -> Payload:
        time_bin(site.site_id, site.config.policy.exact_outcomes, payload)  # refuse exact times before reading data
        if action != SURVIVAL_TABLE and site.config.policy.noise_epsilon is not None:
            raise PolicyError(site.site_id, "noisy_release", "Cox sums were requested; this site releases outcomes "
                              "only as noisy survival tables")
        return function(survival_cohort(site, study), payload)

    return run


STEPS: dict[str, SiteStep] = {
    **{action: SiteStep("outcomes", _kmeans_step(action)) for action in KMEANS_ACTIONS},
    **{action: SiteStep("outcomes", _survival_step(action)) for action in SURVIVAL_ACTIONS},
}
