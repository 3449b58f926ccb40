"""The outcome sections of the study config (:class:`common.config.StudyConfig`): ``outcomes`` (k-means of the
signature, Kaplan-Meier, log-rank, Cox on clusters) and ``prognosis`` (multivariable Cox on covariates)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from common.config_base import _Frozen


class OutcomesConfig(_Frozen):
    """Outcome analytics: federated k-means of the patients' signature, then Kaplan-Meier, log-rank and Cox.

    ``exact_times="auto"``: exact event times and small cells only when every site's policy allows them
    (``SitePolicy.exact_outcomes``); otherwise times are binned to ``time_bin_days`` and cells under a
    site's ``min_cohort`` merged. ``"never"``: always binned.
    """

    k: int = Field(2, ge=2)
    features: tuple[str, ...] = ()  # columns to cluster on; empty: every numeric column of the site's table
    standardise: bool = True  # z-score each feature by its pooled mean and sd before clustering
    init: Literal["kmeans++", "random", "given"] = "kmeans++"  # random: seeded draws; given: initial_centres
    initial_centres: tuple[tuple[float, ...], ...] = ()  # k rows, in the (standardised) clustering space
    local_centres: int = Field(4, ge=1)  # per site, for the federated k-means++
    max_iter: int = Field(300, ge=1)
    tol: float = Field(1e-4, ge=0)
    seed: int = 0
    duration_col: str = "os_days"
    event_col: str = "os_event"
    exact_times: Literal["auto", "never"] = "auto"
    time_bin_days: float = Field(7.0, gt=0)
    alpha: float = Field(0.05, gt=0, lt=1)


class PrognosisConfig(_Frozen):
    """Federated multivariable Cox (lifelines' ``CoxPHFitter(penalizer, l1_ratio)``), evaluated by C-index and
    time-dependent AUC.

    ``table``: where the covariates are: ``clinical.csv`` alone, or one of the site's derived feature tables
    (harmonised radiomics, the signature scores) joined to ``clinical.csv`` on ``patient_id``; ``covariates``
    may name columns of either. A covariate listed in ``levels`` is categorical, coded as indicators of its
    levels (``encoding: reference`` drops the first level; ``full`` keeps them all, collinear without a
    penalizer). ``split_column``: a clinical column of ``train``/``test`` values; train rows fit, test rows
    evaluate. Times leave exact only where every site allows it (``exact_times: auto``), else binned.
    """

    table: str = "clinical.csv"
    duration: str = "os_days"
    event: str = "os_event"
    covariates: tuple[str, ...] = ()
    levels: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    encoding: Literal["reference", "full"] = "reference"
    penalizer: float | tuple[float, ...] = 0.0
    l1_ratio: float = Field(0.0, ge=0, le=1)
    split_column: str | None = None
    exact_times: Literal["auto", "never"] = "auto"
    time_bin_days: float = Field(30.0, gt=0)
    risk_bins: int = Field(64, ge=2, le=512)  # shared risk-score bins of the C-index / AUC tables
    horizons: tuple[float, ...] = ()  # time-dependent AUC at these times (the duration's unit)
    alpha: float = Field(0.05, gt=0, lt=1)

    @field_validator("penalizer")
    @classmethod
    def _non_negative(cls, v: float | tuple[float, ...]) -> float | tuple[float, ...]:
        values = (v,) if isinstance(v, (int, float)) else v
        if any(not (x >= 0 and x < float("inf")) for x in values):
            raise ValueError("penalizer must be finite and >= 0")
        return v

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for col, lv in v.items():
            if len(lv) < 2 or len(set(map(str, lv))) != len(lv):
                raise ValueError(f"levels of {col!r}: at least two distinct values")
        return {col: tuple(str(x) for x in lv) for col, lv in v.items()}


class RadiogenomicsConfig(_Frozen):
    """A federated association table between imaging features (the signature's factors by default) and a
    genomic or molecular column of ``clinical.csv`` with two levels (e.g. a mutation flag): per feature the
    mean difference, the standardised difference, Welch's t-test p-value and the Benjamini-Hochberg q-value."""

    table: str = "signature_scores.csv"  # one of the site's derived feature tables
    features: tuple[str, ...] = ()  # empty: every numeric column of the table
    column: str = "tp53_mutation"
    levels: tuple[str, str] = ("0", "1")  # reference level, compared level
    fdr: float = Field(0.05, gt=0, lt=1)  # the q-value under which a feature is called associated
