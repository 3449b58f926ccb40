"""The site's release ledger: which sets of patients it has released aggregates over, so that no two add up to few.

A sum, count or event table over a set of patients is safe alone when the set is large; two of them over
sets ``S`` and ``T`` give the aggregate over the patients in one and not the other. A curious server that
chooses the groups (k-means centres, cluster labels, relabellings, the classifier's split) can make ``S`` and
``T`` differ by one patient and read that patient's row. The ledger keeps, per *scope* (a kind of data the
site answers about: ``features``, ``survival``, ``classifier-split``; fixed by the site, never by a request),
every set of patients released so far, and allows a new release only if each of its sets ``S`` and each
complement ``U - S`` (``U``, the cohort: its totals are released too) differs from every recorded set, the
empty set and the whole cohort by either no patient or at least ``min_diff`` (the site's ``min_cell``).
This covers the cell itself (``|S|``), its complement (total minus the other cells) and differencing
against any earlier release; it does not bound combinations of three or more releases -- a pairwise rule,
as in statistical disclosure control; ``policy.noise_epsilon`` is the site's stronger option.

A refusal (or a held k-means answer) is itself an answer: "some set here would single out a few patients",
and where it falls among a study's requests says more (a server sweeping a line learns where the first
patient crossed it). So a study's ``max_holds``-th refusal in a scope *freezes* the scope for that study
(every later request is answered as frozen, without looking at the data again: an honest Lloyd run may be
held once early and once near convergence), a study gets at most ``max_requests`` requests per scope, and a
scope refused in ``max_refusals`` studies is *closed* for good (every release refused until the site's
operator deletes the file on purpose). A server learns at most about ``max_refusals x max_holds x
log2(max_requests)`` bits per scope over the site's lifetime (20 x 2 x 6.6 by default), and nothing more by
changing the study, since every study counts. A site that wants none sets ``approved_studies`` (one study,
so at most ``max_holds x log2(max_requests)``) or ``noise_epsilon``.

The file (``derived/release-ledger.json`` at a site; ``None`` keeps it in memory) holds, per scope, the
released sets as sorted lists of salted hashes of patient ids, the studies a scope was frozen in, and the
last answer released per scope and key (what a site answers again when a new one may not leave:
:meth:`ReleaseLedger.last`). It never leaves the site. Writes are whole-file and atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import PolicyError

FORMAT = "fedbiopsy-release-ledger/1"


def digest_id(patient_id: str) -> str:
    """A patient id as the ledger keeps it (a salted, truncated sha256)."""
    return hashlib.sha256(f"fedbiopsy-release:{patient_id}".encode()).hexdigest()[:16]


class ReleaseLedger:
    """Released patient sets per scope, with the pairwise differencing rule of the module docstring."""

    def __init__(self, site_id: str, path: Path | None, min_diff: int, max_refusals: int = 20,
                 max_requests: int = 100, max_holds: int = 2) -> None:
        self.site_id = site_id
        self.path = None if path is None else Path(path)
        self.min_diff = int(min_diff)
        self.max_refusals = int(max_refusals)
        self.max_requests = int(max_requests)
        self.max_holds = int(max_holds)
        self._sets: dict[str, list[frozenset[str]]] = {}
        self._frozen: dict[str, list[str]] = {}  # scope -> studies with a refusal (their count closes the scope)
        self._holds: dict[str, dict[str, int]] = {}  # scope -> study -> refusals
        self._requests: dict[str, dict[str, int]] = {}
        self._last: dict[str, Any] = {}
        if self.path is not None and self.path.is_file():
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            self._sets = {scope: [frozenset(s) for s in sets] for scope, sets in raw.get("sets", {}).items()}
            self._frozen = {scope: list(studies) for scope, studies in raw.get("frozen", {}).items()}
            self._holds = {scope: dict(counts) for scope, counts in raw.get("holds", {}).items()}
            self._requests = {scope: dict(counts) for scope, counts in raw.get("requests", {}).items()}
            self._last = dict(raw.get("last", {}))

    # ------------------------------------------------------------------------------------------ the rule

    def conflict(self, scope: str, universe: Iterable[str], cells: Iterable[Iterable[str]]) -> int | None:
        """The smallest nonzero difference under ``min_diff`` that releasing ``cells`` would make, else None."""
        u = frozenset(digest_id(p) for p in universe)
        new = [frozenset(digest_id(p) for p in cell) for cell in cells]
        candidates = [*new, *(u - c for c in new)]
        known = [frozenset(), u, *self._sets.get(scope, [])]
        worst: int | None = None
        for s in candidates:
            for t in known:
                d = len(s ^ t)
                if 0 < d < self.min_diff and (worst is None or d < worst):
                    worst = d
        return worst

    def closed(self, scope: str) -> bool:
        """Whether ``scope`` was refused in ``max_refusals`` studies: every release in it is refused for good."""
        return len(self._frozen.get(scope, [])) >= self.max_refusals

    def once(self, scope: str, study: str, what: str, request: str = "") -> bool:
        """True the first time ``what`` is asked in ``study`` (recording ``request``, a digest of what was
        asked) and when the very same request is asked again (a rerun: nothing new); False for another one."""
        key = f"once|{what}|{study}"
        seen = self._last.get(f"{scope}|{key}")
        if seen:
            return bool(request) and seen.get("request") == request
        self.keep(scope, key, {"asked": True, "request": request})
        return True

    def frozen(self, scope: str, study: str) -> bool:
        """Whether ``scope`` answers as frozen in ``study`` (``max_holds`` refusals or ``max_requests`` requests
        there, or the scope closed)."""
        if self.closed(scope):
            return True
        return self._holds.get(scope, {}).get(study, 0) >= self.max_holds or \
            self._requests.get(scope, {}).get(study, 0) >= self.max_requests

    def try_release(self, scope: str, universe: Sequence[str], cells: Iterable[Iterable[str]], study: str,
                    count: bool = True) -> bool:
        """Record ``cells`` (sets of patient ids within ``universe``) and ``universe`` if they may leave, and
        return True; else count a refusal of ``scope`` in ``study`` and return False. A frozen scope (see
        :meth:`frozen`) returns False without looking at the data.

        ``count`` False: the request does not count against ``max_requests`` (for sets a study fixes once, such
        as its classifier split, asked again at every round)."""
        if self.frozen(scope, study):
            return False
        counts = self._requests.setdefault(scope, {})
        counts[study] = counts.get(study, 0) + int(count)
        cells = [list(c) for c in cells]
        if self.conflict(scope, universe, cells) is not None:
            holds = self._holds.setdefault(scope, {})
            holds[study] = holds.get(study, 0) + 1
            studies = self._frozen.setdefault(scope, [])
            if study not in studies:
                studies.append(study)
            self._save()
            return False
        recorded = self._sets.setdefault(scope, [])
        for cell in [list(universe), *cells]:
            s = frozenset(digest_id(p) for p in cell)
            if s and s not in recorded:
                recorded.append(s)
        self._save()
        return True

    def release(self, scope: str, universe: Sequence[str], cells: Iterable[Iterable[str]], study: str,
                count: bool = True) -> None:
        """:meth:`try_release`, refusing (rule ``release_ledger``) when the cells may not leave."""
        if not self.try_release(scope, universe, cells, study, count):
            closed = len(self._frozen.get(scope, [])) >= self.max_refusals
            why = (f"closed after refusals in {self.max_refusals} studies" if closed else
                   f"frozen for this study: a set differed from an earlier one by fewer than {self.min_diff} "
                   "patient(s) (now, or at an earlier request of this study)")
            raise PolicyError(self.site_id, "release_ledger", f"scope {scope}: {why}")

    # ------------------------------------------------------------------------------------------ answers

    def last(self, scope: str, key: str) -> Any:
        """The last answer kept with :meth:`keep` for ``scope`` and ``key`` (None if none)."""
        return self._last.get(f"{scope}|{key}")

    def keep(self, scope: str, key: str, answer: dict[str, Any]) -> None:
        """Keep a released answer (arrays as lists) to repeat it when a new one may not leave."""
        self._last[f"{scope}|{key}"] = {k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v
                                        for k, v in answer.items()}
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        data = {"format": FORMAT, "min_diff": self.min_diff,
                "sets": {scope: [sorted(s) for s in sets] for scope, sets in self._sets.items()},
                "frozen": self._frozen, "holds": self._holds, "requests": self._requests, "last": self._last}
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.path)


FEATURES, SURVIVAL, CLASSIFIER_SPLIT = "features", "survival", "classifier-split"  # the scopes a site keeps
# the segmentation held-out cases a study's evaluation summarises, and those of them with further raters (the
# segmentation study's automatic table): two studies whose sets differ by a few patients would give their values
SEGMENTATION_SPLIT, SEGMENTATION_STUDY_SPLIT = "segmentation-split", "segmentation-study-split"
SEGMENTATION_RATERS = "segmentation-raters"  # the cases with further raters' masks (the inter-observer table)


def partition(ids: Sequence[str], labels: np.ndarray) -> list[list[str]]:
    """The patient ids of each label (in label order), the cells of a grouping."""
    arr = np.asarray(labels)
    return [[ids[int(i)] for i in np.flatnonzero(arr == g)] for g in np.unique(arr)]
