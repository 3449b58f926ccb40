"""Federated prognosis: multivariable Cox (lifelines' ``CoxPHFitter(penalizer, l1_ratio)``), evaluated by
Harrell's C-index and the time-dependent (cumulative/dynamic) AUC from the sites' risk tables.

The driver :func:`run_prognosis` over any :class:`common.protocol.Query`:

1. ``prognosis_moments`` on the fitting split (``train``, or ``all`` without a split column): covariate
   moments and crossproducts, the released event times;
2. ``prognosis_sums`` per Newton step: :func:`common.cox.newton_raphson` with lifelines' elastic net, Efron
   ties, normalisation by the pooled moments (exactly ``CoxPHFitter`` on the pooled rows);
3. ``prognosis_risk`` once per split: each site's risk table (:func:`common.prognosis_site.site_prognosis_risk`)
   on shared risk-score bins, from which the server computes, without another round:

   * Harrell's C-index as lifelines' ``concordance_index`` (a pair is comparable when the earlier time is an
     event, or the times are equal and the later one censored; equal scores count one half);
   * the cumulative/dynamic AUC at each horizon as scikit-survival's ``cumulative_dynamic_auc``, with the
     inverse-probability-of-censoring weights of the pooled *train* censoring distribution (its reverse
     Kaplan-Meier, from the same tables);

   each with its error bound: pairs whose scores fall in overlapping segments are counted one half, and the
   bound is half their share. With exact times at a site that allows them and fine bins, the values equal
   lifelines / scikit-survival on the pooled data to that bound; with binned times they are the values of the
   binned data.

The score bins are the normal quantiles of the linear predictor (its pooled variance from the crossproducts),
so that every bin holds about the same share of patients; ``risk_bins`` of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.cox import CoxResult, ElasticNet, cox_result, efron_derivatives, merge_cox_sums, newton_raphson
from common.errors import ConfigError, ProtocolError
from common.outcomes import SurvivalOptions, server_cox_start
from common.pooled_moments import merge_crossproducts
from common.prognosis_metrics import (
    Bounded,
    RiskTable,
    breslow_baseline,
    brier_score,
    calibration,
    censoring_survival,
    concordance,
    dynamic_auc,
    merge_risk_tables,
    uno_concordance,
)
from common.prognosis_site import PROGNOSIS_MOMENTS, PROGNOSIS_RISK, PROGNOSIS_SUMS
from common.protocol import Payload, Query

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrognosisOptions:
    """What the server asks: the penalty, whether the sites split train/test, time release, bins, horizons."""

    penalizer: float | tuple[float, ...] = 0.0
    l1_ratio: float = 0.0
    split: bool = False
    survival: SurvivalOptions = SurvivalOptions()
    exact_if_allowed: bool = False  # binned ``survival`` unless every site allows exact times (then exact)
    risk_bins: int = 64
    horizons: tuple[float, ...] = ()

    @property
    def fit_split(self) -> str:
        return "train" if self.split else "all"

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("train", "test") if self.split else ("all",)


# ============================================================================================ the driver


@dataclass(frozen=True)
class PrognosisResult:
    """The fitted model, its rounds and its evaluation per split (pooled and per site)."""

    cox: CoxResult
    mode: str  # how event times left the sites: exact or binned
    mean: np.ndarray
    scale: np.ndarray
    edges: np.ndarray
    rounds: int
    sites: tuple[str, ...]
    c_index: dict[str, Bounded]  # by split
    c_index_sites: dict[str, dict[str, Bounded]]  # split -> site -> C
    auc: dict[str, dict[float, Bounded]]  # split -> horizon -> AUC
    uno: dict[str, Bounded]  # split -> Uno's C
    brier: dict[str, dict[float, Bounded]]  # split -> horizon -> Brier score
    calibration: dict[str, list[dict]]  # split -> risk groups at ``calibration_horizon``
    calibration_horizon: float | None
    n: dict[str, int]  # patients per split
    events: dict[str, int]
    site_n: dict[str, int]  # patients of the fitting split per site


def risk_edges(beta_norm: np.ndarray, correlation: np.ndarray, bins: int) -> np.ndarray:
    """Inner edges of ``bins`` equal-probability bins of the linear predictor under a normal approximation
    (mean 0 on the pooled-normalised covariates; variance ``beta' R beta``)."""
    from scipy.stats import norm

    if bins < 2:
        raise ConfigError("study config", "prognosis.risk_bins below 2", "use at least 2 risk-score bins")
    sd = float(np.sqrt(max(beta_norm @ correlation @ beta_norm, 0.0)))
    if not sd > 0:
        sd = 1.0  # a null model: every score 0, all in one bin
    return sd * norm.ppf(np.linspace(0, 1, bins + 1)[1:-1])


def _correlation(replies: Mapping[str, Payload], scale: np.ndarray) -> np.ndarray:
    parts = []
    for site in sorted(replies):
        rep = replies[site]
        cross = np.atleast_2d(np.asarray(rep.get("cross"), dtype=np.float64))
        d = scale.size
        if cross.shape != (d, d) or not np.all(np.isfinite(cross)):
            raise ProtocolError(site, "prognosis moments lack a valid 'cross' matrix",
                                "run the same fedbiopsy version at every site")
        parts.append((int(rep["n"]), np.asarray(rep["mean"], dtype=np.float64), cross))  # type: ignore[call-overload]
    n, _, cross = merge_crossproducts(parts)
    return cross / max(n - 1, 1) / np.outer(scale, scale)


def run_prognosis(query: Query, options: PrognosisOptions) -> PrognosisResult:
    """Fit the Cox model on the fitting split, then score every split once; see the module docstring."""
    request: Payload = {**options.survival.request(), "split": options.fit_split}
    first = query(PROGNOSIS_MOMENTS, request)
    survival = options.survival
    if options.exact_if_allowed and survival.time_bin_days is not None and \
            all(bool(r.get("exact_allowed")) for r in first.values()):
        survival = SurvivalOptions(time_bin_days=None, alpha=survival.alpha)
        request = {**request, **survival.request()}
        request.pop("time_bin_days", None)
        first = query(PROGNOSIS_MOMENTS, request)
    probe = ElasticNet(options.penalizer, options.l1_ratio)
    start = server_cox_start(first, None, penalised=probe.active)
    penalty = probe.for_fit(start.names, start.n)
    step = {**request, "mean": start.mean, "scale": start.scale, "event_times": start.event_times}
    rounds = 1 if survival is options.survival else 2  # the moments round (asked again when exact is allowed)

    last: dict[str, object] = {}

    def evaluate(beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        nonlocal rounds
        rounds += 1
        replies = query(PROGNOSIS_SUMS, {**step, "beta": beta})
        sums = merge_cox_sums(replies, start.event_times.size, len(start.names))
        last.update(beta=beta.copy(), sums=sums)
        return efron_derivatives(sums, beta)

    fit = newton_raphson(evaluate, len(start.names), penalty=penalty)
    cox = cox_result(start.names, fit, start.scale)
    edges = risk_edges(fit.beta, _correlation(first, start.scale), options.risk_bins)
    tables: dict[str, RiskTable] = {}
    for split in options.eval_splits:
        replies = query(PROGNOSIS_RISK, {**survival.request(), "split": split,
                                         "beta": fit.beta, "mean": start.mean, "scale": start.scale,
                                         "edges": edges})
        rounds += 1
        tables[split] = merge_risk_tables(replies, edges.size + 1)
    censoring = censoring_survival(tables[options.fit_split])
    c_index = {s: concordance(t) for s, t in tables.items()}
    per_site = {s: {site: concordance(t.of_site(site)) for site in t.site_ids} for s, t in tables.items()}
    auc = {s: {float(h): dynamic_auc(t, float(h), censoring) for h in options.horizons} for s, t in tables.items()}
    uno = {s: uno_concordance(t, censoring) for s, t in tables.items()}
    sums = last["sums"]  # the last Newton round was at the fitted beta: its s0 give Breslow's baseline
    if not np.array_equal(last["beta"], fit.beta):  # type: ignore[arg-type]
        raise ProtocolError("(server)", "the last Newton round was not at the fitted beta", "report this bug")
    baseline = breslow_baseline(start.event_times, sums["death_count"], sums["s0"],  # type: ignore[index]
                                np.unique(tables[options.fit_split].rows[:, 0]))
    brier = {s: {float(h): brier_score(t, float(h), censoring, baseline, edges) for h in options.horizons}
             for s, t in tables.items()}
    horizon = float(sorted(options.horizons)[len(options.horizons) // 2]) if options.horizons else None
    calib = {s: calibration(t, horizon, baseline, edges) if horizon is not None else [] for s, t in tables.items()}
    return PrognosisResult(cox=cox, mode=survival.mode, mean=start.mean, scale=start.scale, edges=edges, rounds=rounds,
                           sites=tuple(sorted(first)), c_index=c_index, c_index_sites=per_site, auc=auc,
                           uno=uno, brier=brier, calibration=calib, calibration_horizon=horizon,
                           n={s: t.n for s, t in tables.items()},
                           events={s: int(t.rows[:, 3].sum()) for s, t in tables.items()},
                           site_n={s: int(r["n"]) for s, r in first.items()})  # type: ignore[call-overload]


__all__ = ["Bounded", "PrognosisOptions", "PrognosisResult", "RiskTable", "censoring_survival", "concordance",
           "dynamic_auc", "merge_risk_tables", "risk_edges", "run_prognosis"]
