"""Patient-level DP-SGD with Opacus inside a site's local step, with one accountant kept across rounds.

* The noise multiplier is sized once for the whole schedule (``rounds x local steps`` at sampling rate
  ``batch / training cases``) to reach the study's target epsilon, and stays fixed.
* The accountant's history is a JSON-able ``dp_state`` that the site step keeps in a state file for the study
  (and model) under ``derived/``: it fixes the noise multiplier across rounds. What the site has *spent* is
  counted by its lifetime ledger (:mod:`client.privacy_ledger`) over every study and phase, at the site's
  ``policy.max_delta``; before a round the site projects the epsilon it would reach and refuses past its
  policy's ``max_epsilon``.
* :func:`check_training_policy` holds the server's DP and batch settings to the site's policy (``require_dp``,
  ``min_batch_size``, ``max_delta``) before any computation on the data.
* Opacus attaches its hooks once per *path* to a module; nnU-Net and DynUNet reach some modules by several paths
  (``decoder.encoder``, ``skip_layers``), which multiplies per-sample gradients. :class:`DedupGradSampleHooks`
  hooks each module object once. ``tests/segmentation/test_dp.py`` checks the result against ``torch.func``.
* Batches draw distinct patients uniformly (fixed size), which Opacus treats as Poisson sampling at rate
  ``q = batch / cases`` -- the usual approximation; the privacy unit is the patient.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import DPSGDConfig
from common.errors import PolicyError
from common.sitedata import SitePolicy

log = logging.getLogger(__name__)


def _dedup_hooks_class() -> type:
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.layers import DPGRU, DPLSTM, DPRNN
    from opacus.utils.module_utils import has_trainable_params

    class DedupGradSampleHooks(GradSampleHooks):
        """Opacus' hooks, attached once per module object however many paths lead to it."""

        def iterate_submodules(self, module: Any, _seen: set[int] | None = None) -> Iterable[Any]:
            seen = set() if _seen is None else _seen
            if id(module) in seen:
                return
            seen.add(id(module))
            if has_trainable_params(module):
                yield module
                if type(module) not in self.GRAD_SAMPLERS and type(module) not in (DPRNN, DPLSTM, DPGRU):
                    return  # handled whole by functorch
            for child in module.children():
                yield from self.iterate_submodules(child, seen)

    return DedupGradSampleHooks


def attach_grad_sample_hooks(net: Any, dedup: bool = True) -> Any:
    """Opacus per-sample-gradient hooks on ``net`` (loss reduction "mean"); call ``.cleanup()`` when done."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    cls = _dedup_hooks_class() if dedup else GradSampleHooks
    return cls(net, batch_first=True, loss_reduction="mean", strict=True)


# RDP orders: Opacus' default grid spends ~99 fractional orders whose series is slow at small noise (about a
# second per epsilon); this grid keeps a few fractional orders and the integers, a valid bound within a few %.
# The noise search uses integer orders only (a looser bound, so the noise it finds is, if anything, larger).
RDP_ORDERS: tuple[float, ...] = (1.25, 1.5, 1.75, *range(2, 64), 80, 96, 128, 256)
SEARCH_ORDERS: tuple[float, ...] = (*range(2, 64), 80, 96, 128, 256)


def _accountant_kwargs(accountant: str, orders: tuple[float, ...] = RDP_ORDERS) -> dict:
    return {"alphas": list(orders)} if accountant == "rdp" else {}


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "rdp") -> float:
    """The noise multiplier that spends ``target_epsilon`` in ``steps`` steps at ``sample_rate``."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha" while searching
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant,
                                          **_accountant_kwargs(accountant, SEARCH_ORDERS)))


def make_accountant(kind: str, history: Iterable[Iterable[float]] = ()) -> Any:
    """An Opacus accountant ("rdp" or "prv") restored from a JSON history of (sigma, q, steps)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def epsilon_of(kind: str, history: Iterable[Iterable[float]], delta: float) -> float:
    """Epsilon spent by a history of (sigma, q, steps) (0 for an empty one)."""
    return _epsilon_cached(kind, tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@functools.lru_cache(maxsize=256)
def _epsilon_cached(kind: str, history: tuple, delta: float) -> float:
    if not history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(make_accountant(kind, history).get_epsilon(delta, **_accountant_kwargs(kind)))


PRV_CEILING = 64.0  # PRV only where RDP is below this: PRV of a tiny noise multiplier exhausts memory


def epsilon_bound(kind: str, history: Iterable[Iterable[float]], delta: float,
                  prv_ceiling: float = PRV_CEILING) -> float:
    """A valid epsilon of ``history`` at ``delta`` whatever the settings: RDP, tightened by PRV when ``kind`` is
    "prv" and RDP is at most ``prv_ceiling`` (so a server-chosen tiny noise cannot make the site run PRV out of
    memory); NaN counts as infinite."""
    hist = [list(h) for h in history]
    eps = epsilon_of("rdp", hist, delta)
    if math.isnan(eps):
        return math.inf
    if kind == "prv" and eps <= prv_ceiling:
        try:
            prv = epsilon_of("prv", hist, delta)
        except (ValueError, ArithmeticError, MemoryError, RuntimeError) as err:  # PRV's domain did not fit
            log.warning("PRV accountant failed (%s); counting RDP's epsilon", type(err).__name__)
        else:
            if math.isfinite(prv) and prv >= 0:
                eps = min(eps, prv)
    return eps


@dataclass
class DPPlan:
    """What a site's DP-SGD does this round."""

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    accountant: str
    delta: float
    history: list[list[float]]

    def state(self, study_hash: str) -> dict:
        """The JSON-able state kept in the site's ledger between rounds."""
        return {"study_hash": study_hash, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "accountant": self.accountant, "delta": self.delta,
                "history": self.history}

    @property
    def epsilon(self) -> float:
        return epsilon_bound(self.accountant, self.history, self.delta)


def plan_round(site_id: str, dp_state: dict | None, study_hash: str, *, target_epsilon: float, delta: float,
               max_grad_norm: float, accountant: str, noise_multiplier: float | None, n_train: int, batch_size: int,
               total_steps: int, round_steps: int, max_epsilon: float, noise_delta: float | None = None) -> DPPlan:
    """This round's DP settings from the persisted state; refuses when the round would pass ``max_epsilon``.

    ``delta`` is the delta the epsilon is counted at (the site's ``policy.max_delta`` at a real site);
    ``noise_delta`` (default ``delta``) the study's delta the noise is sized for, and the target is capped at
    ``max_epsilon`` (a larger one would only be refused later). The projection here covers ``dp_state``'s history;
    the site's lifetime ledger (:mod:`client.privacy_ledger`) then checks the round against every other charge.
    """
    if batch_size > n_train:
        raise PolicyError(site_id, "dp", f"batch size {batch_size} exceeds the {n_train} training case(s); "
                          "DP-SGD needs distinct patients per batch (lower segmentation.batch_size)")
    q = batch_size / n_train
    if dp_state and dp_state.get("study_hash") == study_hash:
        sigma = float(dp_state["noise_multiplier"])
        history = [list(h) for h in dp_state.get("history", [])]
        if float(dp_state.get("sample_rate", q)) != q:
            log.warning("site %s: sampling rate changed from %s to %s", site_id, dp_state.get("sample_rate"), q)
    else:
        target = min(target_epsilon, max_epsilon)
        sigma = noise_multiplier or noise_multiplier_for(target, noise_delta or delta, q, total_steps, accountant)
        history = []
    plan = DPPlan(sigma, q, max_grad_norm, accountant, delta, history)
    spent = plan.epsilon
    projected = epsilon_bound(accountant, history + [[sigma, q, round_steps]], delta)
    if not projected <= max_epsilon:
        raise PolicyError(site_id, "max_epsilon",
                          f"privacy budget exhausted: epsilon spent so far {spent:.3f}; this round would reach "
                          f"{projected:.3f} > max_epsilon {max_epsilon:g} (delta {delta:g}). The site stops training "
                          "for this study; raise policy.max_epsilon or the noise to continue")
    log.info("site %s: DP-SGD sigma %.3f, q %.3f, epsilon %.3f -> %.3f", site_id, sigma, q, spent, projected)
    return plan


def distinct_patients(batch_size: int | None, n_train: int) -> int:
    """Distinct patients in one local gradient step: ``batch_size`` of them (None: all ``n_train``), at most
    ``n_train`` (a larger batch repeats patients)."""
    return n_train if batch_size is None else min(int(batch_size), n_train)


def check_training_policy(site_id: str, policy: SitePolicy, dp: DPSGDConfig, *, batch_size: int | None,
                          n_train: int, what: str) -> None:
    """Hold the study's training settings (the server's choice) to the site's policy, before any data is used.

    Refuses (``PolicyError``): ``require_dp`` without DP; fewer distinct patients per gradient step than
    ``min_batch_size`` (``batch_size`` None: full batch); a DP delta above ``max_delta``. A small noise
    multiplier or a large target epsilon is not refused here: it spends more of the lifetime budget, which the
    ledger refuses (rule ``max_epsilon``).
    """
    if policy.require_dp and not dp.enabled:
        raise PolicyError(site_id, "require_dp", f"{what}: the study trains without DP-SGD and the site's policy "
                          "requires it (policy.require_dp)")
    distinct = distinct_patients(batch_size, n_train)
    if distinct < policy.min_batch_size:
        raise PolicyError(site_id, "min_batch_size", f"{what}: {distinct} distinct patient(s) per gradient step "
                          f"(batch size {batch_size}, {n_train} training case(s)); the policy needs at least "
                          f"{policy.min_batch_size}")
    if dp.enabled and not dp.delta <= policy.max_delta:
        raise PolicyError(site_id, "max_delta", f"{what}: DP delta {dp.delta:g} is above the site's max_delta "
                          f"{policy.max_delta:g}")


class PrivateStep:
    """Opacus around one round's optimizer: per-sample clipping, Gaussian noise, accounting."""

    def __init__(self, net: Any, optimizer: Any, plan: DPPlan, batch_size: int, seed: int) -> None:
        import torch
        from opacus.optimizers import DPOptimizer

        self.plan = plan
        self.hooks = attach_grad_sample_hooks(net)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                                     max_grad_norm=plan.max_grad_norm, expected_batch_size=batch_size,
                                     loss_reduction="mean", generator=gen if _cpu_only(net) else None)
        self.accountant = make_accountant(plan.accountant, plan.history)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))

    def close(self) -> list[list[float]]:
        """Remove the hooks; the updated accountant history."""
        self.hooks.cleanup()
        self.plan.history = [list(h) for h in self.accountant.history]
        return self.plan.history


def _cpu_only(net: Any) -> bool:
    return all(p.device.type == "cpu" for p in net.parameters())


def per_sample_grads_func(net: Any, loss_fn: Callable, x: Any, y: Any) -> dict[str, Any]:
    """Ground truth per-sample gradients by ``torch.func`` (vmap of grad), keyed by parameter name.

    Runs on a deep copy: ``functional_call`` does not restore the parameters of a sub-module reachable by several
    paths (nnU-Net's ``all_modules``, ``decoder.encoder``), leaving plain tensors in the network it was given.
    """
    import copy

    import torch
    from torch.func import functional_call, grad, vmap

    net = copy.deepcopy(net)
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in net.named_buffers()}

    def one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(net, (p, buffers), (xi[None],)), yi[None])

    return vmap(grad(one), in_dims=(None, 0, 0), randomness="same")(params, x, y)


def per_sample_grads_opacus(net: Any, loss_fn: Callable, x: Any, y: Any, dedup: bool = True) -> dict[str, Any]:
    """Per-sample gradients as Opacus computes them (hooks mode), keyed by parameter name."""
    hooks = attach_grad_sample_hooks(net, dedup=dedup)
    try:
        net.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        return {k: p.grad_sample.detach().clone() for k, p in net.named_parameters() if p.requires_grad}
    finally:
        hooks.cleanup()
        net.zero_grad(set_to_none=True)


def max_relative_error(got: dict[str, Any], ref: dict[str, Any]) -> float:
    """max over parameters of max |got - ref| / max |ref|, with a floor of 1e-3 of the largest reference value.

    The floor keeps parameters whose true gradient is zero up to rounding (a conv bias before an instance norm)
    from dominating with ratios of noise.
    """
    floor = 1e-3 * max(float(r.abs().max()) for r in ref.values())
    worst = 0.0
    for key, r in ref.items():
        if key not in got or got[key] is None:
            return math.inf
        worst = max(worst, float((got[key] - r).abs().max()) / max(float(r.abs().max()), floor))
    return worst


def read_ledger(path: Path) -> dict | None:
    """A site's DP accountant state for one study (None before its first private round)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_ledger(path: Path, state: dict) -> Path:
    """Keep a site's DP accountant state: written whole, then moved into place (a crash leaves the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, path)
    return path
