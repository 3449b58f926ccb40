"""The site's privacy guard: every request is bounded by the site's policy, every answer leaves through it.

The server is not trusted: the study config that travels with every message and every request field are
the server's choice. :func:`check_study` holds the study to the site's ``policy`` (``site.yaml``) before a
step reads any data: the phase, the approved studies and apps, the cohort size, which clinical columns may
be used and how (``policy.columns``), which settings and tables may be named (names, never paths). Steps
bound their own request fields (time bins, batch sizes, DP budget, histogram bins) by the same policy.

What leaves: :func:`public_reason` turns any refusal or failure into a fixed text naming the rule and the
fix, never a value, an id, a path or exception text (those go to the site's own logs); :func:`check_reply`
scans an answer before it is sent and refuses one that carries a patient id or a path of the site.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from common.config import StudyConfig
from common.errors import FedBiopsyError, PolicyError
from common.maps.layout import is_map
from common.sitedata import ColumnKind, ColumnUse, Site, SiteConfig, SitePolicy

log = logging.getLogger(__name__)
REFUSAL_LOG = Path("derived") / "policy-refusals.jsonl"
ERROR_LOG = Path("derived") / "site-errors.jsonl"

RULES: dict[str, str] = {
    "allowed_phases": "this site does not take part in this phase; the site may add it to policy.allowed_phases",
    "approved_apps": "the app running here is not approved by the site; ask the site to approve its hash "
                     "(policy.approved_apps)",
    "approved_studies": "this study config is not approved by the site; ask the site to approve its hash "
                        "(policy.approved_studies)",
    "min_cohort": "the reply would aggregate over fewer patients than the site allows (policy.min_cohort); "
                  "pool fewer groups or leave this site out",
    "min_cell": "the reply would hold a cell of fewer patients than the site allows (policy.min_cell); "
                "use fewer groups or coarser bins",
    "exact_outcomes": "the site releases only binned times with small cells merged (policy.exact_outcomes); "
                      "ask for binned outcomes",
    "allowed_columns": "the study uses a clinical column the site does not allow for that use "
                       "(policy.columns); use only the columns the site lists",
    "allowed_names": "the study names a settings file or table the site does not list (policy.radiomics_settings, "
                     "policy.feature_tables); name one of the site's",
    "release_ledger": "together with what the site already released, this answer would single out fewer "
                      "patients than policy.min_cell (such a refusal freezes the kind of answer for the study); "
                      "repeat an earlier request or change the groups by more",
    "request_shape": "the request's shape does not fit the study (e.g. centres other than outcomes.k); send the "
                     "study's shape",
    "noisy_release": "this site releases outcomes only as noisy statistics (policy.noise_epsilon); ask for noisy "
                     "survival tables or k-means",
    "histogram_bins": "more histogram or score bins than the site releases (policy.histogram_bins); use fewer",
    "percentiles": "a requested percentile is outside the range the site releases, or too many were asked; use "
                   "at most 16 inner percentiles",
    "min_batch_size": "a training step would use fewer patients than the site allows (policy.min_batch_size); "
                      "use larger batches",
    "require_dp": "this site trains only with differential privacy (policy.require_dp); enable DP-SGD in the study",
    "max_delta": "the study's DP delta is above the site's (policy.max_delta); lower it",
    "max_epsilon": "the site's lifetime privacy budget (policy.max_epsilon) would be exceeded; the site takes no "
                   "further part in private training",
    "dp": "the DP-SGD settings do not fit the site's cohort; use smaller batches",
    "reply_check": "the site's answer failed its last check before release and was withheld; the site's "
                   "operator sees why in its log",
}
GENERIC_DATA = ("the site could not answer from its data or the request did not fit its protocol version; "
                "the site's operator sees why in derived/site-errors.jsonl")
GENERIC_INTERNAL = "the site step failed; the site's operator sees why in derived/site-errors.jsonl"


def public_reason(err: BaseException, site_id: str | None = None) -> str:
    """The text a refusal or failure may carry off the site: who, the rule and its fix, or a fixed sentence.

    ``site_id`` is the site's own (from its ``site.yaml``), never a text of the error.
    """
    who = f"site {site_id!r}" if site_id else "the site"
    if isinstance(err, PolicyError):
        return f"{who} refuses: policy rule {err.rule!r}: {RULES.get(err.rule, 'see the site policy')}"
    if isinstance(err, FedBiopsyError):
        return f"{who}: {GENERIC_DATA}"
    return f"{who}: {GENERIC_INTERNAL}"


def _append(path: Path, entry: Mapping[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}, default=str) + "\n")
    return path


def record_refusal(site_dir: Path, err: PolicyError, message_type: str, run_id: int | None = None,
                   study_hash: str | None = None) -> Path:
    """Append one refusal, with its full detail, to the site's own log; returns the log's path."""
    return _append(Path(site_dir) / REFUSAL_LOG, {"run_id": run_id, "message_type": message_type, "rule": err.rule,
                                                  "study_hash": study_hash, "detail": str(err)})


def record_error(site_dir: Path, err: BaseException, message_type: str, run_id: int | None = None) -> Path:
    """Append one failure (type and text) to the site's own log; returns the log's path."""
    return _append(Path(site_dir) / ERROR_LOG, {"run_id": run_id, "message_type": message_type,
                                                "error": type(err).__name__, "detail": str(err)})


# ============================================================================================ the study


def check_app(config: SiteConfig, app_hash: str) -> None:
    """Raise :class:`PolicyError` (rule ``approved_apps``) unless the site approved the app with this hash.

    An empty ``policy.approved_apps`` approves nothing: the site's SuperExec (:mod:`deploy.site_exec`) runs
    no submitted app until the site has reviewed one and listed its hash.
    """
    if app_hash not in config.policy.approved_apps:
        raise PolicyError(config.site_id, "approved_apps", f"app {app_hash[:12]}... is not approved by this site")


def check_request(config: SiteConfig, phase: str, study_hash: str, n_cases: int) -> None:
    """Raise :class:`PolicyError` naming the rule when the site must refuse this request outright.

    Which code may answer (``approved_apps``) is decided before any app code runs, by :func:`check_app` in the
    site's SuperExec (:mod:`deploy.site_exec`).
    """
    policy, sid = config.policy, config.site_id
    if phase not in policy.allowed_phases:
        raise PolicyError(sid, "allowed_phases", f"phase {phase!r} is not allowed ({', '.join(policy.allowed_phases)})")
    if policy.approved_studies and study_hash not in policy.approved_studies:
        raise PolicyError(sid, "approved_studies", f"study config {study_hash[:12]}... is not approved by this site")
    if n_cases < policy.min_cohort:
        raise PolicyError(sid, "min_cohort", f"{n_cases} usable case(s), policy needs at least {policy.min_cohort}")


def require_column(site_id: str, policy: SitePolicy, column: str, use: ColumnUse,
                   kind: ColumnKind | None = None) -> None:
    """Refuse (rule ``allowed_columns``) unless the site lists ``column`` for ``use`` (and of ``kind``)."""
    spec = policy.columns.get(column)
    if spec is None or use not in spec.uses or (kind is not None and spec.kind != kind):
        allowed = spec.uses if spec else ()
        raise PolicyError(site_id, "allowed_columns",
                          f"column {column!r} as {use}{f' ({kind})' if kind else ''}: the policy allows "
                          f"{', '.join(allowed) or 'no use'}{f' as {spec.kind}' if spec else ''}")


def require_name(site_id: str, value: str, allowed: Iterable[str], what: str) -> None:
    """Refuse (rule ``allowed_names``) unless ``value`` is one of the site's listed names (never a path)."""
    names = tuple(allowed)
    if value not in names or Path(value).name != value:
        raise PolicyError(site_id, "allowed_names", f"{what} {value!r} is not one of {list(names)}")


def check_maps(site: Site, study: StudyConfig) -> None:
    """Every parametric map a 4D study asks for must be one the site's policy lets it fit (``policy.maps``)."""
    for channel in study.channels:
        if is_map(channel):
            require_name(site.site_id, channel, site.config.policy.maps, "parametric map")


def check_study(site: Site, phase: str, study: StudyConfig) -> None:
    """Hold the fields of the study that ``phase`` uses to the site's policy (before any data is read)."""
    policy, sid = site.config.policy, site.site_id
    if study.four_d and not site.tabular:
        check_maps(site, study)
    if phase == "features":
        require_name(sid, study.features.settings, policy.radiomics_settings, "radiomics settings")
    elif phase == "harmonisation":
        h = study.harmonisation
        require_name(sid, h.features_file, policy.feature_tables, "feature table")
        require_name(sid, h.output_file, policy.feature_tables, "output table")
        if h.batch is not None:
            require_column(sid, policy, h.batch, "batch", "categorical")
        for col in h.categorical:
            require_column(sid, policy, col, "covariate", "categorical")
        for col in h.continuous:
            require_column(sid, policy, col, "covariate", "continuous")
    elif phase == "reduction":
        require_name(sid, study.reduction.input_file, policy.feature_tables, "feature table")
        require_name(sid, study.reduction.scores_file, policy.feature_tables, "scores table")
    elif phase == "classifier":
        c = study.classifier
        require_column(sid, policy, c.label, "label")
        for col in c.fairness_attributes:
            require_column(sid, policy, col, "fairness", "categorical")
        if study.classifier.features != "compact":
            require_name(sid, study.harmonisation.output_file, policy.feature_tables, "feature table")
            require_name(sid, study.harmonisation.features_file, policy.feature_tables, "feature table")
    elif phase == "outcomes":
        require_column(sid, policy, study.outcomes.duration_col, "survival", "continuous")
        require_column(sid, policy, study.outcomes.event_col, "survival", "categorical")


# ============================================================================================ the answer


def _strings(value: object) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, np.ndarray) and value.dtype.kind in "USO":
        for v in value.ravel().tolist():
            yield from _strings(v)


def check_reply(site: Site, reply: Mapping[str, object]) -> None:
    """Refuse (rule ``reply_check``) an answer any text of which holds a patient id or a path of the site.

    A last line of defence: each step already answers aggregates only. Ids are matched as whole tokens, so a
    short id such as ``"3"`` does not match every number.
    """
    ids = {c.patient_id for c in site.cases}
    root = str(site.root.resolve())
    for text in _strings(dict(reply)):
        if root in text or str(site.root) in text:
            raise PolicyError(site.site_id, "reply_check", "a reply text names a path of the site")
        tokens = set(text.replace("/", " ").replace(",", " ").replace(":", " ").replace("=", " ").split())
        hit = ids & tokens
        if hit or text in ids:
            raise PolicyError(site.site_id, "reply_check", f"a reply text names patient id(s) {sorted(hit)[:3]}")


__all__ = ["RULES", "check_app", "check_reply", "check_request", "check_study", "public_reason", "record_error",
           "record_refusal", "require_column", "require_name"]
