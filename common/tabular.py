"""A site's covariate table for the prognosis phase: the study's columns checked and coded, at the site.

The columns come from ``clinical.csv`` (any header a registry exports: spaces, commas, slashes) and, where
the study names one, a derived feature table joined on ``patient_id``. :func:`check_columns` lists every
problem (column, what is wrong, how many rows: never a value); :func:`covariate_design` codes the covariates
(continuous as numbers, categorical as indicators of the study's levels) and keeps the complete rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from common.config import PrognosisConfig

TRAIN, TEST = "train", "test"
_EVENT_VALUES = {0.0, 1.0}


@dataclass(frozen=True)
class ColumnProblem:
    """One thing wrong with one column (``rows``: how many rows show it)."""

    column: str
    problem: str
    fix: str
    rows: int = 0
    fatal: bool = True

    @property
    def what(self) -> str:
        """The problem with its column and row count (no fix)."""
        count = f" in {self.rows} row(s)" if self.rows else ""
        return f"column {self.column!r}: {self.problem}{count}"

    def __str__(self) -> str:
        return f"{self.what}. Fix: {self.fix}"


def study_columns(cfg: PrognosisConfig) -> tuple[str, ...]:
    """Every column the study's prognosis section names."""
    cols = [cfg.duration, cfg.event, *cfg.covariates]
    if cfg.split_column:
        cols.append(cfg.split_column)
    return tuple(dict.fromkeys(cols))


def _numeric(series: pd.Series) -> tuple[pd.Series, int]:
    values = pd.to_numeric(series, errors="coerce")
    bad = int((values.isna() & series.notna()).sum())
    return values, bad


def _value_problems(col: str, present: pd.Series, cfg: PrognosisConfig) -> list[ColumnProblem]:
    """What is wrong with the non-missing values of one column, for the role the study gives it."""
    if col == cfg.duration:
        values, bad = _numeric(present)
        out = [ColumnProblem(col, "holds non-numeric durations", "write durations as numbers", bad)] if bad else []
        negative = int((values < 0).sum())
        if negative:
            out.append(ColumnProblem(col, "holds negative durations", "durations are >= 0", negative))
        return out
    if col == cfg.event:
        values, bad = _numeric(present)
        odd = bad + int((~values.dropna().isin(_EVENT_VALUES)).sum())
        return [ColumnProblem(col, "holds event flags other than 0 and 1",
                              "code the event as 1 (event) or 0 (censored)", odd)] if odd else []
    if col == cfg.split_column:
        odd = int((~present.astype(str).isin((TRAIN, TEST))).sum())
        return [ColumnProblem(col, f"holds values other than {TRAIN!r} and {TEST!r}", f"mark each row {TRAIN} or "
                              f"{TEST}", odd)] if odd else []
    if col in cfg.levels:
        odd = int((~present.astype(str).isin(cfg.levels[col])).sum())
        return [ColumnProblem(col, "holds values outside the study's levels",
                              "recode them or add the level to prognosis.levels", odd)] if odd else []
    _, bad = _numeric(present)
    return [ColumnProblem(col, "holds non-numeric values for a continuous covariate",
                          "write numbers, or list its levels in prognosis.levels", bad)] if bad else []


def check_columns(frame: pd.DataFrame, cfg: PrognosisConfig) -> list[ColumnProblem]:
    """The problems of ``frame`` (one row per patient) for the study's prognosis columns; missing values are
    non-fatal (those rows are left out)."""
    problems: list[ColumnProblem] = []
    for col in study_columns(cfg):
        if col not in frame.columns:
            problems.append(ColumnProblem(col, "is not in the table", "add the column or name another in the study"))
            continue
        series = frame[col]
        missing = int(series.isna().sum())
        if missing:
            problems.append(ColumnProblem(col, "has missing values (those rows are left out)",
                                          "fill them or accept the complete-case analysis", missing, fatal=False))
        problems.extend(_value_problems(col, series.dropna(), cfg))
    return problems


def covariate_names(cfg: PrognosisConfig) -> tuple[str, ...]:
    """The model's covariates: continuous columns by name, categorical ones as ``column=level`` indicators."""
    names: list[str] = []
    for col in cfg.covariates:
        if col in cfg.levels:
            levels = cfg.levels[col] if cfg.encoding == "full" else cfg.levels[col][1:]
            names.extend(f"{col}={lv}" for lv in levels)
        else:
            names.append(col)
    return tuple(names)


@dataclass(frozen=True)
class Design:
    """The coded table of the complete rows: covariates, durations, events, split and patient ids."""

    x: np.ndarray
    names: tuple[str, ...]
    durations: np.ndarray
    events: np.ndarray
    split: np.ndarray  # "train"/"test", or "all" without a split column
    ids: tuple[str, ...]
    dropped: int  # rows left out for a missing value
    categories: dict[str, np.ndarray] = field(default_factory=dict)  # each categorical covariate's values


def rare_levels(design: Design, floor: int) -> int:
    """How many (split, categorical covariate, level) cells hold between 1 and ``floor - 1`` patients, every
    level counted, the reference too (its indicator is the others' complement)."""
    bad = 0
    for split in np.unique(design.split):
        rows = design.split == split
        for values in design.categories.values():
            _, counts = np.unique(values[rows], return_counts=True)
            bad += int(((counts > 0) & (counts < floor)).sum())
    return bad


def covariate_design(frame: pd.DataFrame, cfg: PrognosisConfig, complete_over: tuple[str, ...] = ()) -> Design:
    """Code ``frame`` (indexed by patient id) for the model; raise ``ValueError`` naming the first fatal problem
    (callers turn it into a site error naming the file).

    The rows kept are those complete in the study's columns *and* in ``complete_over`` (a site passes every
    column it could let a study use, so that which patients a reply covers does not depend on which covariates
    the server names: four covariate lists with different missing values would otherwise add up to one patient).
    """
    fatal = [p for p in check_columns(frame, cfg) if p.fatal]
    if fatal:
        raise ValueError(str(fatal[0]))
    cols = list(dict.fromkeys([*study_columns(cfg), *(c for c in complete_over if c in frame.columns)]))
    complete = frame[cols].notna().all(axis=1)
    data = frame[complete]
    blocks: list[np.ndarray] = []
    for col in cfg.covariates:
        if col in cfg.levels:
            levels = cfg.levels[col] if cfg.encoding == "full" else cfg.levels[col][1:]
            text = data[col].astype(str)
            blocks.extend((text == lv).to_numpy(dtype=np.float64) for lv in levels)
        else:
            blocks.append(pd.to_numeric(data[col]).to_numpy(dtype=np.float64))
    x = np.stack(blocks, axis=1) if blocks else np.zeros((len(data), 0))
    split = data[cfg.split_column].astype(str).to_numpy() if cfg.split_column else np.full(len(data), "all")
    return Design(x=x, names=covariate_names(cfg), durations=pd.to_numeric(data[cfg.duration]).to_numpy(np.float64),
                  events=pd.to_numeric(data[cfg.event]).to_numpy(np.float64).astype(np.int64), split=split,
                  ids=tuple(str(i) for i in data.index), dropped=int((~complete).sum()),
                  categories={col: data[col].astype(str).to_numpy() for col in cfg.covariates if col in cfg.levels})


__all__ = ["ColumnProblem", "Design", "check_columns", "covariate_design", "covariate_names", "rare_levels",
           "study_columns"]
