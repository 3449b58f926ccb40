"""ComBat's options and design spec: what fixes the design matrix before a fit (pooled or federated).

neuroCombat's options (:class:`CombatOptions`), and :class:`CombatSpec`: the features, the batches with
their counts, the categorical levels and (federated fits) the sites holding each batch, as agreed by the
summary round. Both travel as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from common.errors import FedBiopsyError


class CombatDataError(FedBiopsyError, ValueError):
    """Data or covariates that ComBat cannot use as they are."""


@dataclass(frozen=True)
class CombatOptions:
    """neuroCombat's options. ``batch``: the covariate holding the batch (None: each site is one batch)."""

    batch: str | None = None
    categorical: tuple[str, ...] = ()
    continuous: tuple[str, ...] = ()
    eb: bool = True
    parametric: bool = True
    mean_only: bool = False
    ref_batch: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "categorical", tuple(self.categorical))
        object.__setattr__(self, "continuous", tuple(self.continuous))
        names = [*self.categorical, *self.continuous]
        if self.batch is not None:
            names.append(self.batch)
        dupes = sorted({c for c in names if names.count(c) > 1})
        if dupes:
            raise CombatDataError(f"covariate(s) {dupes} named more than once among batch/categorical/continuous; "
                                  "name each column in one role only")

    @property
    def covariate_columns(self) -> tuple[str, ...]:
        """The covariate columns a site must hold (batch column first, when there is one)."""
        return ((self.batch,) if self.batch else ()) + self.categorical + self.continuous

    def to_dict(self) -> dict:
        """The options as JSON-ready values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> CombatOptions:
        """Options from :meth:`to_dict`'s output (missing keys take the defaults); raises on unknown keys."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise CombatDataError(f"unknown ComBat option(s) {unknown}")
        d = {**asdict(cls()), **data}
        return cls(batch=d["batch"], categorical=tuple(d["categorical"]), continuous=tuple(d["continuous"]),
                   eb=bool(d["eb"]), parametric=bool(d["parametric"]), mean_only=bool(d["mean_only"]),
                   ref_batch=d["ref_batch"])


@dataclass(frozen=True)
class CombatSpec:
    """Everything that fixes the design matrix, agreed before the fit: features, batches, levels, options."""

    options: CombatOptions
    features: tuple[str, ...]
    batches: tuple[str, ...]  # sorted
    batch_counts: tuple[int, ...]
    categorical_levels: tuple[tuple[str, ...], ...] = ()  # per options.categorical, sorted; the first is dropped
    batch_sites: tuple[tuple[str, ...], ...] = ()  # per batch, the sites holding it (federated fits only)

    @classmethod
    def build(cls, options: CombatOptions, features: Sequence[str], batch_counts: Mapping[str, int],
              levels: Mapping[str, Sequence[str]], batch_sites: Mapping[str, Sequence[str]] | None = None
              ) -> CombatSpec:
        """A spec from the (merged) batch counts and categorical levels; raises on what ComBat cannot fit."""
        batches = tuple(sorted(batch_counts))
        if len(features) < 2:
            raise CombatDataError(f"{len(features)} feature(s); ComBat's priors need at least 2 features")
        if len(set(features)) != len(features):
            raise CombatDataError("feature names repeat; give every feature column a unique name")
        if options.ref_batch is not None and options.ref_batch not in batches:
            raise CombatDataError(f"ref_batch {options.ref_batch!r} is not one of the batches {list(batches)}")
        sites = batch_sites or {}
        return cls(
            options=options,
            features=tuple(features),
            batches=batches,
            batch_counts=tuple(int(batch_counts[b]) for b in batches),
            categorical_levels=tuple(tuple(sorted(levels[c])) for c in options.categorical),
            batch_sites=tuple(tuple(sorted(sites.get(b, ()))) for b in batches) if sites else (),
        )

    @property
    def n_batch(self) -> int:
        """The number of batches."""
        return len(self.batches)

    @property
    def n_features(self) -> int:
        """The number of features."""
        return len(self.features)

    @property
    def n_cases(self) -> int:
        """The number of patients over every batch."""
        return int(sum(self.batch_counts))

    @property
    def ref_index(self) -> int | None:
        """The reference batch's row (None without ``ref_batch``)."""
        return None if self.options.ref_batch is None else self.batches.index(self.options.ref_batch)

    @property
    def design_columns(self) -> tuple[str, ...]:
        """Names of the design matrix's columns (batch one-hots, covariate one-hots, continuous)."""
        cats = tuple(f"{c}={lev}" for c, levels in zip(self.options.categorical, self.categorical_levels, strict=True)
                     for lev in levels[1:])
        return tuple(f"batch={b}" for b in self.batches) + cats + self.options.continuous

    def spans_sites(self) -> bool:
        """Whether some batch is held by more than one site (then the server runs the EB step)."""
        return any(len(s) > 1 for s in self.batch_sites)

    def sites_of(self, batch_index: int) -> str:
        """The sites holding a batch, for error messages."""
        if not self.batch_sites:
            return "(pooled)"
        return ", ".join(self.batch_sites[batch_index])

    def to_json(self) -> str:
        """The spec as JSON (sorted keys), as it travels in the ComBat requests."""
        data = {
            "options": self.options.to_dict(), "features": list(self.features), "batches": list(self.batches),
            "batch_counts": list(self.batch_counts), "categorical_levels": [list(v) for v in self.categorical_levels],
            "batch_sites": [list(v) for v in self.batch_sites],
        }
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CombatSpec:
        """The spec that :meth:`to_json` wrote."""
        d = json.loads(text)
        return cls(
            options=CombatOptions.from_dict(d["options"]), features=tuple(d["features"]),
            batches=tuple(d["batches"]), batch_counts=tuple(int(x) for x in d["batch_counts"]),
            categorical_levels=tuple(tuple(v) for v in d["categorical_levels"]),
            batch_sites=tuple(tuple(v) for v in d["batch_sites"]),
        )
