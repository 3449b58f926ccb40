"""Federated Cox proportional hazards (Efron's ties) by Newton-Raphson on per-site risk-set sums.

lifelines' ``CoxPHFitter`` (penalizer 0) normalises the covariates by their pooled mean and sd (ddof 1),
runs Newton-Raphson from 0 with its ``StepSizer`` (start 0.95) and stops on ``norm(delta) < 1e-7``, a
relative log-likelihood change under 1e-9, a Newton decrement under 1e-7, 500 steps or a step below 1e-5;
the coefficients are then divided by the sd. Everything in Efron's gradient, Hessian and partial
log-likelihood is a sum, at each distinct event time, over the patients at risk and over those with the
event; both sums add across sites. So one Newton step is one round: the server sends beta, each site
answers those sums at every event time (:func:`site_cox_sums`), and the server runs lifelines' own
iteration on the pooled sums (:func:`efron_derivatives`, :func:`newton_raphson`). Covariate moments come
first (:mod:`common.pooled_moments`).

Privacy of the risk-set sums. At each event time a site sends the size of its risk set, the sums of
exp(x.beta), exp(x.beta) x and exp(x.beta) x x' over it, and the same sums over the patients with the
event there, and sum(x) over them. These are aggregates, but: (1) the event times themselves are listed
(exact mode: patient-level times), (2) a tie group of one event is one patient's covariate vector
(``x_death``), and (3) the difference of two consecutive risk-set sums is the sum over the patients who
left between them, and sums at several betas can be solved for the individual values. Hence the exact
protocol runs only where the site's policy allows exact outcomes; otherwise times are binned and small
cells merged exactly as for the Kaplan-Meier tables (:func:`common.survival.released_data`), so that each
difference of consecutive risk sets spans at least ``min_cell`` patients, and a site refuses
(``min_events_per_time``) to send tie sums over fewer than that many events. When the covariates are
group indicators (Cox on cluster membership) every sum is a function of the per-group event table already
released for Kaplan-Meier and log-rank, and nothing further is disclosed.

The rounds over a site's cohort are in :mod:`common.outcomes_site`, the driver is
:func:`common.outcomes.run_cox`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.errors import ConfigError, PolicyError, ProtocolError
from common.pooled_moments import check_matrix
from common.protocol import Payload

log = logging.getLogger(__name__)
SUM_KEYS: tuple[str, ...] = ("risk_count", "s0", "s1", "s2", "death_count", "d0", "d1", "d2", "x_death")


def site_event_times(durations: np.ndarray, events: np.ndarray) -> np.ndarray:
    """The site's distinct (released) event times."""
    return np.unique(np.asarray(durations, dtype=np.float64)[np.asarray(events) == 1])


def site_cox_sums(site_id: str, X: np.ndarray, durations: np.ndarray, events: np.ndarray, beta: np.ndarray,
                  mean: np.ndarray, scale: np.ndarray, event_times: np.ndarray,
                  min_events_per_time: int = 1) -> Payload:
    """The site step of one Newton step: risk-set and tie sums of the normalised covariates at each event time.

    ``durations``/``events`` are the site's released data (validated, binned/merged where the policy
    says so); ``event_times`` the pooled distinct event times, which must include the site's own.
    """
    x = check_matrix(site_id, X, "covariate matrix")
    t = np.asarray(durations, dtype=np.float64)
    e = np.asarray(events).astype(bool)
    tau = np.asarray(event_times, dtype=np.float64)
    d = x.shape[1]
    b = np.asarray(beta, dtype=np.float64)
    if b.shape != (d,) or np.asarray(mean).shape != (d,) or np.asarray(scale).shape != (d,):
        raise ProtocolError(site_id, f"beta/mean/scale do not match the site's {d} covariate(s)",
                            "use the same covariate columns at every site")
    missing = np.setdiff1d(site_event_times(t, e), tau)
    if missing.size:
        raise ProtocolError(site_id, f"{missing.size} of the site's event times are not among the server's",
                            "send the pooled event times of the same (binned) data")
    xn = (x - mean) / scale
    phi = np.exp(xn @ b)
    phix = phi[:, None] * xn
    phixx = phix[:, :, None] * xn[:, None, :]
    order = np.argsort(t, kind="stable")
    ts = t[order]

    def tail(values: np.ndarray) -> np.ndarray:  # sums over rows with t >= each tau
        cum = np.concatenate([np.cumsum(values[order][::-1], axis=0)[::-1], np.zeros((1,) + values.shape[1:])])
        return cum[np.searchsorted(ts, tau, side="left")]

    pos = np.searchsorted(tau, t[e])
    j = tau.size

    def at_deaths(values: np.ndarray) -> np.ndarray:
        out = np.zeros((j,) + values.shape[1:])
        np.add.at(out, pos, values[e])
        return out

    ones = np.ones(t.size)
    death_count = at_deaths(ones)
    small = (death_count > 0) & (death_count < min_events_per_time)
    if np.any(small):
        raise PolicyError(site_id, "min_cohort",
                          f"{int(small.sum())} event time(s) with fewer than {min_events_per_time} events; their "
                          "tie sums would disclose single patients' covariates (use exact mode or wider time bins)")
    return {
        "risk_count": tail(ones), "s0": tail(phi), "s1": tail(phix), "s2": tail(phixx),
        "death_count": death_count, "d0": at_deaths(phi), "d1": at_deaths(phix), "d2": at_deaths(phixx),
        "x_death": at_deaths(xn),
    }


def site_cox_summary(site_id: str, X: np.ndarray, events: np.ndarray) -> Payload:
    """Per covariate: whether it is 0/1 at the site, and its sum over the site's events (a count when 0/1)."""
    x = check_matrix(site_id, X, "covariate matrix")
    e = np.asarray(events).astype(bool)
    return {"binary": np.all((x == 0) | (x == 1), axis=0).astype(np.float64), "x_events_sum": x[e].sum(axis=0),
            "n_events": int(e.sum()), "n": int(x.shape[0]), "ones": (x == 1).sum(axis=0).astype(np.float64)}


def check_separation(replies: Mapping[str, Mapping[str, object]], names: tuple[str, ...]) -> None:
    """Refuse a 0/1 covariate one of whose levels has no event at any site (its coefficient is infinite)."""
    sites = sorted(replies)
    binary = np.all([np.asarray(replies[s]["binary"]) > 0 for s in sites], axis=0)
    events = sum(int(replies[s]["n_events"]) for s in sites)  # type: ignore[call-overload]
    ev_ones = np.sum([np.asarray(replies[s]["x_events_sum"], dtype=np.float64) for s in sites], axis=0)
    for j, name in enumerate(names):
        if not binary[j]:
            continue
        for level, count in ((1, ev_ones[j]), (0, events - ev_ones[j])):
            if count == 0:
                holders = [s for s in sites
                           if (np.asarray(replies[s]["ones"])[j] if level == 1
                               else int(replies[s]["n"]) - np.asarray(replies[s]["ones"])[j]) > 0]  # type: ignore[call-overload]
                raise ProtocolError(", ".join(holders) or "(pooled)",
                                    f"the group {name} = {level} has no events at any site (patients at "
                                    f"{holders}); its hazard ratio is infinite (complete separation)",
                                    "merge the group with another or drop the covariate")


def merge_cox_sums(replies: Mapping[str, Mapping[str, object]], n_times: int, d: int) -> dict[str, np.ndarray]:
    """The server step: the pooled sums, after checking every reply's shapes."""
    shapes = {"risk_count": (n_times,), "s0": (n_times,), "s1": (n_times, d), "s2": (n_times, d, d),
              "death_count": (n_times,), "d0": (n_times,), "d1": (n_times, d), "d2": (n_times, d, d),
              "x_death": (n_times, d)}
    total = {k: np.zeros(s) for k, s in shapes.items()}
    for site in sorted(replies):
        for key, shape in shapes.items():
            if key not in replies[site]:
                raise ProtocolError(site, f"Cox reply lacks {key!r}", "run the same fedbiopsy version at every site")
            value = np.asarray(replies[site][key], dtype=np.float64).reshape(-1)
            if value.size != int(np.prod(shape)) or not np.all(np.isfinite(value)):
                raise ProtocolError(site, f"Cox reply {key!r} has {value.size} value(s) (or non-finite ones), "
                                    f"expected shape {shape}", "run the same fedbiopsy version at every site")
            total[key] += value.reshape(shape)
    if np.any(total["death_count"] <= 0):
        raise ProtocolError("(pooled)", "an event time without any event in the pooled sums",
                            "send the pooled event times of the same data to every site")
    return total


def efron_derivatives(sums: Mapping[str, np.ndarray], beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Hessian, gradient and partial log-likelihood of Efron's approximation (lifelines' formulas)."""
    d = beta.shape[0]
    hessian = np.zeros((d, d))
    gradient = np.zeros(d)
    loglik = 0.0
    for j in range(sums["s0"].shape[0]):
        ties = int(round(float(sums["death_count"][j])))
        s0, s1, s2 = sums["s0"][j], sums["s1"][j], sums["s2"][j]
        d0, d1, d2 = sums["d0"][j], sums["d1"][j], sums["d2"][j]
        if ties > 1:
            inc = np.arange(ties) / ties
            denom = 1.0 / (s0 - inc * d0)
            numer = s1 - np.multiply.outer(inc, d1)
            a1 = s2 * denom.sum() - d2 * (inc * denom).sum()
        else:
            denom = 1.0 / np.array([s0])
            numer = s1[None, :]
            a1 = s2 * denom[0]
        summand = numer * denom[:, None]
        gradient = gradient + sums["x_death"][j] - summand.sum(0)
        loglik = loglik + float(sums["x_death"][j] @ beta) + float(np.log(denom).sum())
        hessian = hessian + (summand.T @ summand - a1)
    return hessian, gradient, loglik


class _StepSizer:
    """lifelines' step-size schedule for Newton-Raphson (``lifelines.utils.StepSizer``)."""

    def __init__(self, initial: float) -> None:
        self.initial = initial
        self.step = initial
        self.temper_back_up = False
        self.norms: list[float] = []

    def update(self, norm_delta: float) -> float:
        self.norms.append(norm_delta)
        if self.temper_back_up:
            self.step = min(self.step * 1.3, self.initial)
        if norm_delta >= 15.0:
            self.step *= 0.1
            self.temper_back_up = True
        elif 15.0 > norm_delta > 5.0:
            self.step *= 0.25
            self.temper_back_up = True
        recent = self.norms[-3:]
        if len(self.norms) >= 3:
            if np.all(np.diff(recent) < 0):
                self.step = min(self.step * 1.3, 1.0)
            else:
                self.step *= 0.98
        return self.step


@dataclass(frozen=True)
class CoxFit:
    """A Newton-Raphson fit on normalised covariates."""

    beta: np.ndarray  # on the normalised scale
    loglik: float
    hessian: np.ndarray
    n_iter: int
    converged: bool


@dataclass(frozen=True)
class ElasticNet:
    """lifelines' elastic-net penalty of ``CoxPHFitter(penalizer, l1_ratio)`` on the normalised coefficients:
    ``n * sum(penalizer * (l1_ratio * soft_abs(beta, a) + (1 - l1_ratio) / 2 * beta**2))``, with the smooth
    ``soft_abs(x, a) = (log(1 + exp(-a x)) + log(1 + exp(a x))) / a`` sharpened as ``a = 1.3**i`` at Newton step
    ``i`` (Schmidt, Fung & Rosales 2009). ``n`` is the pooled number of patients; ``penalizer`` a scalar or one
    value per covariate."""

    penalizer: float | tuple[float, ...] = 0.0
    l1_ratio: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        p = np.asarray(self.penalizer, dtype=np.float64)
        if np.any(~np.isfinite(p)) or np.any(p < 0):
            raise ValueError("penalizer must be finite and >= 0")
        if not 0.0 <= self.l1_ratio <= 1.0:
            raise ValueError("l1_ratio must be in [0, 1]")

    @property
    def active(self) -> bool:
        """Whether any covariate is penalised (lifelines adds the penalty only then)."""
        return bool(np.any(np.asarray(self.penalizer, dtype=np.float64) > 0))

    def for_fit(self, names: tuple[str, ...], n: int) -> ElasticNet:
        """This penalty for a fit of ``names`` over ``n`` pooled patients (one penalizer, or one per covariate)."""
        if not np.isscalar(self.penalizer) and len(self.penalizer) != len(names):  # type: ignore[arg-type]
            raise ConfigError("study config", f"{len(self.penalizer)} penalizer value(s) for {len(names)} "  # type: ignore[arg-type]
                              "covariate(s)", "give one penalizer, or one per covariate column")
        return ElasticNet(self.penalizer, self.l1_ratio, n)

    def terms(self, beta: np.ndarray, i: int) -> tuple[float, np.ndarray, np.ndarray]:
        """The penalty, its gradient and the diagonal of its Hessian at ``beta`` and Newton step ``i``."""
        from scipy.special import expit

        a = 1.3 ** i
        p = np.broadcast_to(np.asarray(self.penalizer, dtype=np.float64), beta.shape)
        l1 = self.l1_ratio
        soft_abs = (np.logaddexp(0, -a * beta) + np.logaddexp(0, a * beta)) / a
        value = self.n * float((p * (l1 * soft_abs + 0.5 * (1 - l1) * beta**2)).sum())
        grad = self.n * p * (l1 * np.tanh(a * beta / 2) + (1 - l1) * beta)
        curv = self.n * p * (l1 * 2 * a * expit(a * beta) * expit(-a * beta) + (1 - l1))
        return value, grad, curv


def newton_raphson(evaluate: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, float]], d: int,
                   step_size: float = 0.95, precision: float = 1e-7, r_precision: float = 1e-9,
                   max_steps: int = 500, penalty: ElasticNet | None = None) -> CoxFit:
    """lifelines' Newton-Raphson loop (``CoxPHFitter._newton_raphson_for_efron_model``), with its elastic-net
    penalty when ``penalty`` is active.

    ``evaluate(beta)`` returns (hessian, gradient, log-likelihood); federated, it is one round of
    :func:`site_cox_sums` and :func:`efron_derivatives`. The penalty is the server's: it depends only on beta,
    the step and the pooled ``n``.
    """
    from scipy.linalg import LinAlgError
    from scipy.linalg import solve as spsolve

    beta = np.zeros(d)
    delta = np.zeros(d)
    sizer = _StepSizer(step_size)
    step = sizer.step
    previous_ll = 0.0
    i = 0
    while True:
        beta = beta + step * delta
        i += 1
        hessian, gradient, ll = evaluate(beta)
        if penalty is not None and penalty.active:
            value, grad, curv = penalty.terms(beta, i)
            ll, gradient = ll - value, gradient - grad
            hessian = hessian.copy()
            hessian[np.diag_indices(d)] -= curv
        try:
            delta = spsolve(-hessian, gradient, assume_a="pos", check_finite=False)
        except (ValueError, LinAlgError) as exc:
            raise ProtocolError("(pooled)", f"Cox Newton step failed ({exc})",
                                "check for collinear or constant covariates (or set a penalizer > 0), or groups "
                                "without events") from exc
        if np.any(np.isnan(delta)):
            raise ProtocolError("(pooled)", "Cox Newton step is NaN",
                                "check for collinear covariates or groups without events")
        norm_delta = float(np.linalg.norm(delta)) if delta.size else 0.0
        decrement = float(gradient @ delta) / 2
        if norm_delta < precision:
            converged = True
        elif previous_ll != 0 and abs(ll - previous_ll) / (-previous_ll) < r_precision:
            converged = True
        elif decrement < precision:
            converged = True
        elif i >= max_steps or step <= 0.00001:
            converged = False
        elif abs(ll) < 0.0001 and norm_delta > 1.0:
            log.warning("Cox: log-likelihood near 0 with a large step: complete separation?")
            converged = False
        else:
            previous_ll = ll
            step = sizer.update(norm_delta)
            continue
        break
    if not converged:
        log.warning("Cox Newton-Raphson did not converge after %d step(s)", i)
    return CoxFit(beta=beta, loglik=ll, hessian=hessian, n_iter=i, converged=converged)


@dataclass(frozen=True)
class CoxResult:
    """Coefficients on the covariates' own scale, as lifelines reports them."""

    names: tuple[str, ...]
    params: np.ndarray
    se: np.ndarray
    loglik: float
    n_iter: int
    converged: bool

    def coefficients(self) -> pd.Series:
        """The coefficients as lifelines' ``params_``: a Series named ``coef``, indexed by ``covariate``."""
        return pd.Series(self.params, index=pd.Index(list(self.names), name="covariate"), name="coef")

    def summary(self, alpha: float = 0.05) -> dict:
        """Per covariate: coefficient, standard error, hazard ratio with its ``1 - alpha`` interval, Wald p."""
        from scipy import stats

        z = stats.norm.ppf(1 - alpha / 2)
        out = {}
        for name, b, se in zip(self.names, self.params, self.se, strict=True):
            out[name] = {"coef": float(b), "se": float(se), "hazard_ratio": float(np.exp(b)),
                         "hr_lower": float(np.exp(b - z * se)), "hr_upper": float(np.exp(b + z * se)),
                         "p": float(2 * stats.norm.sf(abs(b / se))) if se > 0 else float("nan")}
        return out


def cox_result(names: tuple[str, ...], fit: CoxFit, scale: np.ndarray) -> CoxResult:
    """Undo the normalisation: lifelines' ``params_`` and standard errors."""
    cov = -np.linalg.inv(fit.hessian) / np.outer(scale, scale)
    return CoxResult(names=names, params=fit.beta / scale, se=np.sqrt(np.diag(cov)), loglik=fit.loglik,
                     n_iter=fit.n_iter, converged=fit.converged)
