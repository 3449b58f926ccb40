"""The site's one lifetime privacy ledger: every DP release on its patients, across studies, runs and phases.

``<site_dir>/derived/privacy-ledger.json`` is an append-only list of charges, each a Gaussian mechanism
``(noise_multiplier, sample_rate, steps)`` with the study hash, the phase (``segmentation``, ``classifier``,
``statistics``), the model and when it ran::

    {"format": "fedbiopsy-privacy-ledger/1",
     "charges": [{"id": "...", "time": "2025-01-01T10:00:00+00:00", "study_hash": "...", "phase": "classifier",
                  "model": "logistic", "round": 3, "accountant": "rdp",
                  "mechanism": {"noise_multiplier": 1.1, "sample_rate": 0.2, "steps": 4}}, ...],
     "pending": [ ... the same, plus "pid" and "host": work that is running now ... ],
     "migrated": ["segmentation/dp-ledger-<hash>.json", ...]}

The epsilon a site has spent is the Opacus accountant's over ALL its charges, at the site's ``policy.max_delta``
(never a study's delta): RDP always (cheap, and a valid bound whatever the server asks), tightened by PRV when the
step asks for it and RDP is within ``2 x max_epsilon`` (PRV of a tiny noise multiplier runs out of memory: a
server must not be able to choose that). The file is rewritten whole (tmp + ``os.replace``) under an exclusive
``fcntl.flock`` on ``privacy-ledger.json.lock``, so parallel site processes neither lose a charge nor read a
half-written file; it survives restarts (it is just the file).

Training reserves its charge before it touches the data (:meth:`SiteBudget.reserve`): the reservation is
refused (``PolicyError`` rule ``max_epsilon``) when committed + running + this charge would pass
``max_epsilon``; it becomes a charge when the work succeeds and is dropped when it fails (a reservation of a
process that died is dropped on the next write). Noisy statistics charge a Gaussian release in one go
(:func:`charge_gaussian`). The per-study ``dp-ledger-*.json`` files of earlier versions are read into the ledger
once (their histories become charges, re-counted at the site's delta).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from client.training.dp import epsilon_bound
from common.errors import PolicyError
from common.sitedata import SitePolicy

log = logging.getLogger(__name__)

LEDGER = Path("derived") / "privacy-ledger.json"
FORMAT = "fedbiopsy-privacy-ledger/1"
Phase = Literal["segmentation", "classifier", "statistics"]
PHASES: tuple[str, ...] = ("segmentation", "classifier", "statistics")
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
_OLD_LEDGERS = (("segmentation", "segmentation/dp-ledger-*.json"), ("classifier", "classifier/dp-ledger-*.json"))


@dataclass(frozen=True)
class Mechanism:
    """A subsampled Gaussian mechanism run ``steps`` times: noise multiplier (noise SD / sensitivity), rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a positive number, not {self.noise_multiplier!r}")
        if not (0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], not {self.sample_rate!r}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, not {self.steps!r}")

    def to_json(self) -> dict[str, float | int]:
        return {"noise_multiplier": float(self.noise_multiplier), "sample_rate": float(self.sample_rate),
                "steps": int(self.steps)}


@dataclass(frozen=True)
class Charge:
    """One entry of the ledger: what ran on the site's patients, for which study, phase and model."""

    study_hash: str
    phase: str
    model: str
    mechanism: Mechanism
    accountant: str = "rdp"
    round: int | None = None
    time: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, not {self.phase!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, not {self.accountant!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "time": self.time or _now(), "study_hash": self.study_hash,
                               "phase": self.phase, "model": self.model, "round": self.round,
                               "accountant": self.accountant, "mechanism": self.mechanism.to_json()}
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Charge:
        known = {"id", "time", "study_hash", "phase", "model", "round", "accountant", "mechanism"}
        m = entry["mechanism"]
        return cls(study_hash=str(entry["study_hash"]), phase=str(entry["phase"]), model=str(entry.get("model", "")),
                   mechanism=Mechanism(float(m["noise_multiplier"]), float(m["sample_rate"]), int(m["steps"])),
                   accountant=str(entry.get("accountant", "rdp")), round=entry.get("round"),
                   time=str(entry.get("time", "")), id=str(entry.get("id") or uuid.uuid4().hex),
                   extra={k: v for k, v in entry.items() if k not in known})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def ledger_path(site_root: Path | str) -> Path:
    """Where a site keeps its lifetime privacy ledger."""
    return Path(site_root) / LEDGER


# ------------------------------------------------------------------------------------------- file access


@contextlib.contextmanager
def _locked(site_root: Path | str) -> Iterator[Path]:
    """Hold the ledger's lock (exclusive, blocking) for one read-modify-write; yields the ledger's path."""
    path = ledger_path(site_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+", encoding="utf-8") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _load(site_id: str, path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"format": FORMAT, "charges": [], "pending": [], "migrated": []}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT or not isinstance(doc.get("charges"), list):
            raise ValueError(f"not a {FORMAT} document")
        [Charge.from_json(c) for c in doc["charges"]]  # every entry must parse
    except (ValueError, KeyError, TypeError) as err:
        # Never start from zero on a damaged ledger: the site cannot know what it spent, so it trains no more.
        raise PolicyError(site_id, "max_epsilon", f"the privacy ledger {path} cannot be read ({err}); "
                          "restore it from a backup before any further private work") from err
    doc.setdefault("pending", [])
    doc.setdefault("migrated", [])
    return doc


def _save(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _alive(entry: dict[str, Any]) -> bool:
    """Whether the process that made a reservation is still running (on this host)."""
    if entry.get("host") != socket.gethostname():
        return True  # another host's process: cannot tell, keep counting it
    try:
        os.kill(int(entry["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def _migrate(site_id: str, site_root: Path, doc: dict[str, Any]) -> bool:
    """Read the per-study ``dp-ledger-*.json`` files of earlier versions into ``doc`` once; True if any."""
    derived = Path(site_root) / "derived"
    done = set(doc["migrated"])
    changed = False
    for phase, pattern in _OLD_LEDGERS:
        for old in sorted(derived.glob(pattern)):
            rel = old.relative_to(derived).as_posix()
            if rel in done:
                continue
            try:
                state = json.loads(old.read_text(encoding="utf-8"))
                charges = [Charge(str(state.get("study_hash", "")), phase, "migrated",
                                  Mechanism(float(sigma), float(q), int(steps)), extra={"migrated_from": rel})
                           for sigma, q, steps in state.get("history", [])]
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise PolicyError(site_id, "max_epsilon", f"the old DP ledger {old} cannot be read into the "
                                  f"lifetime ledger ({err}); repair or remove it") from err
            doc["charges"].extend(c.to_json() for c in charges)
            doc["migrated"].append(rel)
            changed = True
            log.info("privacy ledger: read %s into the lifetime ledger", rel)
    return changed


@contextlib.contextmanager
def _document(site_id: str, site_root: Path | str) -> Iterator[dict[str, Any]]:
    """The ledger under its lock, with old ledgers migrated and dead reservations dropped; saved if changed."""
    with _locked(site_root) as path:
        doc = _load(site_id, path)
        before = json.dumps(doc, sort_keys=True)
        _migrate(site_id, Path(site_root), doc)
        doc["pending"] = [p for p in doc["pending"] if _alive(p)]
        yield doc
        if json.dumps(doc, sort_keys=True) != before:
            _save(path, doc)


# ------------------------------------------------------------------------------------------- accounting


def _history(charges: Iterable[Charge]) -> list[list[float]]:
    """Charges as an accountant history, equal (sigma, q) merged (composition adds their steps exactly)."""
    steps: dict[tuple[float, float], int] = {}
    for c in charges:
        key = (c.mechanism.noise_multiplier, c.mechanism.sample_rate)
        steps[key] = steps.get(key, 0) + c.mechanism.steps
    return [[s, q, n] for (s, q), n in sorted(steps.items())]


def epsilon_of_charges(charges: Iterable[Charge], policy: SitePolicy, accountant: str = "rdp") -> float:
    """The epsilon that ``charges`` spend together at the site's ``max_delta`` (see the module's notes)."""
    return epsilon_bound(accountant, _history(charges), policy.max_delta, prv_ceiling=2 * policy.max_epsilon)


def _committed(doc: dict[str, Any]) -> list[Charge]:
    return [Charge.from_json(c) for c in doc["charges"]]


def _running(doc: dict[str, Any]) -> list[Charge]:
    return [Charge.from_json(p) for p in doc["pending"]]


def read_charges(site_root: Path | str, site_id: str = "") -> list[Charge]:
    """The site's committed charges, oldest first (a fresh read of the file)."""
    with _document(site_id, site_root) as doc:
        return _committed(doc)


def spent_epsilon(site_root: Path | str, policy: SitePolicy, accountant: str = "rdp",
                  study_hash: str | None = None, site_id: str = "") -> float:
    """Epsilon the site has spent over its lifetime at ``policy.max_delta`` (only ``study_hash``'s when given)."""
    charges = read_charges(site_root, site_id)
    if study_hash is not None:
        charges = [c for c in charges if c.study_hash == study_hash]
    return epsilon_of_charges(charges, policy, accountant)


def project(site_root: Path | str, policy: SitePolicy, charges: Iterable[Charge], accountant: str = "rdp",
            site_id: str = "") -> float:
    """The lifetime epsilon after ``charges``, counting the work other processes are running now."""
    with _document(site_id, site_root) as doc:
        return epsilon_of_charges(_committed(doc) + _running(doc) + list(charges), policy, accountant)


def _refuse_past_budget(site_id: str, doc: dict[str, Any], policy: SitePolicy, new: list[Charge],
                        accountant: str) -> float:
    spent = epsilon_of_charges(_committed(doc), policy, accountant)
    projected = epsilon_of_charges(_committed(doc) + _running(doc) + new, policy, accountant)
    if not projected <= policy.max_epsilon:  # NaN refuses too
        what = ", ".join(f"{c.phase}/{c.model} sigma {c.mechanism.noise_multiplier:.4g} q "
                         f"{c.mechanism.sample_rate:.4g} x{c.mechanism.steps}" for c in new)
        raise PolicyError(site_id, "max_epsilon",
                          f"privacy budget exhausted: epsilon spent so far {spent:.3f} (lifetime, every study and "
                          f"phase, delta {policy.max_delta:g}); {what} would reach {projected:.3f} > max_epsilon "
                          f"{policy.max_epsilon:g}. The site takes no further part in private work; raise "
                          "policy.max_epsilon or the noise to continue")
    return projected


@dataclass
class Reservation:
    """Work allowed to run: it becomes a charge on success (its ``projected`` lifetime epsilon is then spent)."""

    charges: list[Charge]
    projected: float
    committed: bool = False


@contextlib.contextmanager
def reserve(site_id: str, site_root: Path | str, policy: SitePolicy, charges: Iterable[Charge],
            accountant: str = "rdp") -> Iterator[Reservation]:
    """Check the budget and hold it for ``charges`` while the block runs; charge them if it succeeds.

    Raises ``PolicyError`` (rule ``max_epsilon``) before the block runs when the lifetime epsilon with these
    charges would pass ``policy.max_epsilon``. An exception in the block drops the reservation (nothing ran to
    release), and the exception propagates.
    """
    new = list(charges)
    marks = {"pid": os.getpid(), "host": socket.gethostname()}
    with _document(site_id, site_root) as doc:
        projected = _refuse_past_budget(site_id, doc, policy, new, accountant)
        doc["pending"].extend({**c.to_json(), **marks} for c in new)
    ids = {c.id for c in new}
    res = Reservation(new, projected)
    try:
        yield res
    except BaseException:
        with _document(site_id, site_root) as doc:
            doc["pending"] = [p for p in doc["pending"] if p.get("id") not in ids]
        raise
    with _document(site_id, site_root) as doc:
        doc["pending"] = [p for p in doc["pending"] if p.get("id") not in ids]
        doc["charges"].extend(replace(c, time=_now()).to_json() for c in new)
    res.committed = True
    log.info("site %s: privacy ledger charged %s; lifetime epsilon <= %.3f of %g", site_id,
             ", ".join(f"{c.phase}/{c.model}" for c in new), projected, policy.max_epsilon)


def check_and_charge(site_id: str, site_root: Path | str, policy: SitePolicy, charges: Iterable[Charge],
                     accountant: str = "rdp") -> float:
    """Charge work that is released right away (e.g. a noisy statistic); refuses past the budget. The new
    lifetime epsilon."""
    with reserve(site_id, site_root, policy, charges, accountant) as res:
        pass
    return res.projected


def charge_gaussian(site_id: str, site_root: Path | str, policy: SitePolicy, *, study_hash: str,
                    noise_multiplier: float, model: str = "statistics", releases: int = 1,
                    extra: dict[str, Any] | None = None) -> float:
    """Charge ``releases`` Gaussian releases of sensitivity-1 statistics (noise SD ``noise_multiplier`` x
    sensitivity, no subsampling) under phase ``statistics``; refuses past the budget. The new lifetime epsilon.

    Call it before the noisy values leave the site (after computing them is fine: nothing was released yet).
    """
    charge = Charge(study_hash, "statistics", model, Mechanism(noise_multiplier, 1.0, releases), extra=extra or {})
    return check_and_charge(site_id, site_root, policy, [charge])


@dataclass(frozen=True)
class SiteBudget:
    """What a site's training step needs of the ledger: who trains what, under which policy."""

    site_id: str
    site_root: Path
    policy: SitePolicy
    study_hash: str
    phase: str
    model: str
    accountant: str = "rdp"

    def reserve(self, mechanism: Mechanism, server_round: int | None = None
                ) -> contextlib.AbstractContextManager[Reservation]:
        """Hold the budget for one round of ``mechanism`` (see :func:`reserve`)."""
        charge = Charge(self.study_hash, self.phase, self.model, mechanism, self.accountant, server_round)
        return reserve(self.site_id, self.site_root, self.policy, [charge], self.accountant)

    def study_epsilon(self) -> float:
        """The epsilon this study has spent at the site (every phase and model), at the site's delta."""
        return spent_epsilon(self.site_root, self.policy, self.accountant, self.study_hash, self.site_id)

    def lifetime_epsilon(self) -> float:
        """The epsilon the site has spent over its lifetime, at the site's delta."""
        return spent_epsilon(self.site_root, self.policy, self.accountant, site_id=self.site_id)


__all__ = ["LEDGER", "PHASES", "Charge", "Mechanism", "Reservation", "SiteBudget", "charge_gaussian",
           "check_and_charge", "epsilon_of_charges", "ledger_path", "project", "read_charges", "reserve",
           "spent_epsilon"]
