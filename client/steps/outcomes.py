"""Site steps of the outcomes phase: ``query.kmeans`` and ``query.survival``, aggregates only.

The site clusters on its feature table (``derived/signature_scores.csv``, else ``features_harmonised.csv``,
else ``features.csv``: rows ``patient_id``, numeric columns) and keeps the cluster labels in
``derived/clusters.csv``; survival comes from ``clinical.csv`` (``os_days``/``os_event`` by default).
The site's policy decides how exact a reply may be: with ``exact_outcomes`` false (the default) cluster
cells and survival cells under ``min_cohort`` are withheld or merged and times are binned.

Each message carries ``op``: kmeans ``moments`` | ``local_centres`` | ``assign`` | ``labels``;
survival ``table`` | ``cox_moments`` | ``cox``.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pandas as pd

from client.steps.base import Payload, SiteStep, work_dir
from common.config import StudyConfig
from common.cox import site_cox_sums
from common.errors import PolicyError, ProtocolError, SiteDataError
from common.kmeans import assign_labels, inertia, site_cluster_sums, site_local_centres
from common.pooled_moments import require_cohort, site_moments
from common.sitedata import CLINICAL_COLUMNS, Site, read_clinical
from common.survival import EXACT, Released, released_data, survival_table_payload

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


def _min_cell(site: Site) -> int:
    policy = site.config.policy
    return 1 if policy.exact_outcomes else policy.min_cohort


def _standardised(payload: Payload, X: np.ndarray) -> np.ndarray:
    return (X - np.asarray(payload["mean"], dtype=np.float64)) / np.asarray(payload["scale"], dtype=np.float64)


def kmeans_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """One k-means round at the site (see the module docstring for the ops)."""
    op = str(payload.get("op", ""))
    frame, source = feature_table(site, study)
    policy = site.config.policy
    X = frame.to_numpy()
    if op == "moments":
        out = site_moments(site.site_id, X, policy.min_cohort)
        out.update(features=[str(c) for c in frame.columns], source=source, exact_outcomes=bool(policy.exact_outcomes))
        return out
    Z = _standardised(payload, X)
    if op == "local_centres":
        seed = (int(payload.get("seed", 0)) + zlib.crc32(site.site_id.encode())) % 2**31  # type: ignore[call-overload]
        return site_local_centres(site.site_id, Z, int(payload["n_centres"]), _min_cell(site), seed,  # type: ignore[call-overload]
                                  policy.min_cohort)
    if op == "assign":
        previous = payload.get("previous")
        return site_cluster_sums(site.site_id, Z, np.asarray(payload["centres"]),
                                 None if previous is None else np.asarray(previous), _min_cell(site), policy.min_cohort)
    if op == "labels":
        require_cohort(site.site_id, Z.shape[0], policy.min_cohort)
        centres = np.asarray(payload["centres"], dtype=np.float64)
        labels = assign_labels(Z, centres)
        out_path = work_dir(site) / CLUSTERS_FILE
        pd.DataFrame({"patient_id": frame.index, "cluster": labels}).to_csv(out_path, index=False)
        log.info("site %s: cluster labels of %d patient(s) written to %s", site.site_id, labels.size, out_path)
        return {"n": int(labels.size), "inertia": inertia(Z, centres, labels)}
    raise ProtocolError(site.site_id, f"unknown kmeans op {op!r}", "run the same fedbiopsy version at every site")


def survival_data(site: Site, study: StudyConfig) -> pd.DataFrame:
    """The site's patients with a cluster label and their survival columns (stays at the site)."""
    path = work_dir(site) / CLUSTERS_FILE
    if not path.is_file():
        raise SiteDataError(path, "no cluster labels", "run the k-means step of the outcomes phase first")
    clusters = pd.read_csv(path, dtype={"patient_id": str}).set_index("patient_id")
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


def _released(site: Site, study: StudyConfig, payload: Payload) -> Released:
    mode = str(payload.get("mode", ""))
    policy = site.config.policy
    if mode == EXACT and not policy.exact_outcomes:
        raise PolicyError(site.site_id, "exact_outcomes",
                          "exact event times were requested; this site allows only binned times with small cells "
                          "merged")
    data = survival_data(site, study)
    cfg = study.outcomes
    try:
        return released_data(site.site_id, data[cfg.duration_col], data[cfg.event_col], data["cluster"],
                             min_cohort=policy.min_cohort,
                             time_bin_days=None if mode == EXACT else float(payload["time_bin_days"]),  # type: ignore[arg-type]
                             min_cell=_min_cell(site))
    except ProtocolError as err:
        raise ProtocolError(site.site_id, f"clinical.csv {cfg.duration_col}/{cfg.event_col}: {err.problem}",
                            "correct clinical.csv") from err


def _dummies(rel: Released, groups: list) -> np.ndarray:
    return np.stack([(rel.groups == g).astype(np.float64) for g in groups[1:]], axis=1)


def survival_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """One survival round at the site (see the module docstring for the ops)."""
    op = str(payload.get("op", ""))
    rel = _released(site, study, payload)
    if op == "table":
        binned = None if str(payload.get("mode")) == EXACT else float(payload["time_bin_days"])  # type: ignore[arg-type]
        return survival_table_payload(rel, binned, _min_cell(site))
    groups = [int(g) for g in payload["groups"]]  # type: ignore[attr-defined]
    X = _dummies(rel, groups)
    if op == "cox_moments":
        return site_moments(site.site_id, X, 1)
    if op == "cox":
        # Group indicators: every sum is a function of the released per-group table, so no tie-size rule applies.
        return site_cox_sums(site.site_id, X, rel.times, rel.events, np.asarray(payload["beta"]),
                             np.asarray(payload["mean"]), np.asarray(payload["scale"]),
                             np.asarray(payload["event_times"]), min_events_per_time=1)
    raise ProtocolError(site.site_id, f"unknown survival op {op!r}", "run the same fedbiopsy version at every site")


STEPS: dict[str, SiteStep] = {
    "kmeans": SiteStep("outcomes", kmeans_step),
    "survival": SiteStep("outcomes", survival_step),
}
