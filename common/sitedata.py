"""A hospital's data on disk: ``site.yaml``, ``clinical.csv``, images and masks, as typed objects.

Layout (see docs/ARCHITECTURE.md)::

    site_dir/
      site.yaml
      clinical.csv                      patient_id, age, sex, label, os_days, os_event, ...
      images/<patient_id>/<sequence>.nii.gz
      images/<patient_id>/DWI.nii.gz + DWI.bval   optional 4D series (see common/maps/layout.py); their maps go
      images/<patient_id>/DCE.nii.gz + DCE.json   to derived/maps/<patient_id>/<MAP>.nii.gz
      masks/<patient_id>.nii.gz
      raters/<patient_id>/<rater>.nii.gz  optional: other radiologists' masks of the case (masks/ is rater 1),
                                          for the segmentation study's inter-observer table
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import ConfigError
from common.imageio import find_image

CLINICAL_COLUMNS: tuple[str, ...] = ("patient_id", "age", "sex", "label", "os_days", "os_event")
ALL_PHASES: tuple[str, ...] = (
    "fingerprint", "preprocessing", "segmentation", "features", "harmonisation", "reduction",
    "classifier", "outcomes", "prognosis", "radiogenomics", "rollcall",
)


FEATURE_TABLES: tuple[str, ...] = ("features.csv", "features_harmonised.csv", "signature_scores.csv")
DEFAULT_MAPS: tuple[str, ...] = ("ADC", "Ktrans", "ve", "vp", "TTP", "washin", "washout", "iAUC60", "ER")
ColumnKind = Literal["categorical", "continuous"]
ColumnUse = Literal["covariate", "batch", "stratum", "fairness", "label", "survival", "split", "genomic"]


class ClinicalColumn(BaseModel):
    """One clinical.csv column the site lets a study use: its kind and what for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ColumnKind
    uses: tuple[ColumnUse, ...]


DEFAULT_COLUMNS: dict[str, ClinicalColumn] = {
    "age": ClinicalColumn(kind="continuous", uses=("covariate",)),
    "sex": ClinicalColumn(kind="categorical", uses=("covariate", "stratum", "fairness")),
    "scanner": ClinicalColumn(kind="categorical", uses=("covariate", "batch", "fairness")),
    "label": ClinicalColumn(kind="categorical", uses=("label",)),
    "os_days": ClinicalColumn(kind="continuous", uses=("survival",)),
    "os_event": ClinicalColumn(kind="categorical", uses=("survival",)),
}


class SitePolicy(BaseModel):
    """What a hospital allows to run on its data, enforced at the site before any computation and on every reply.

    The study config and every request field are chosen by the server; these bounds are the site's own and a
    request can only be refused by them or coarsened to them (see :mod:`client.guard`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    allowed_phases: tuple[str, ...] = ALL_PHASES
    approved_studies: tuple[str, ...] = ()  # study-config hashes; empty: any study
    approved_apps: tuple[str, ...] = ()  # app hashes (client/apphash.py); empty: the site SuperExec runs none
    max_epsilon: float = Field(8.0, gt=0)  # lifetime, over every study and phase, at the site's max_delta
    max_delta: float = Field(1e-5, gt=0, lt=1)  # the delta every epsilon is counted at; a study may ask less
    require_dp: bool = False  # training on this site's patients only with DP-SGD
    min_batch_size: int = Field(2, ge=1)  # fewest distinct patients per local gradient step
    min_cohort: int = Field(5, ge=1)  # fewest patients any reply aggregates over
    min_cell: int | None = Field(None, ge=1)  # fewest patients per released cell; None: min_cohort
    exact_outcomes: bool = False  # allow exact event times, cells under min_cell and overlapping releases
    cox_newton: bool = False  # answer multivariable Cox's Newton rounds: risk-set sums weighted by exp(x.beta) at a
    # server-chosen beta, from which covariate values within a risk-set cell can be solved (the site's choice)
    max_ledger_refusals: int = Field(20, ge=1)  # studies a release-ledger scope may be frozen in, then closed
    max_ledger_requests: int = Field(100, ge=1)  # requests a study may make of one ledger scope, then frozen
    max_ledger_holds: int = Field(2, ge=1)  # refusals a study may meet in one ledger scope, then frozen
    time_bin_days: float = Field(7.0, gt=0)  # finest survival time bin the site releases
    noise_epsilon: float | None = Field(None, gt=0)  # set: survival tables and k-means answers leave with Gaussian
    # noise of this epsilon each (charged to the lifetime privacy ledger)
    noise_clip: float = Field(3.0, gt=0)  # noisy k-means: each standardised row scaled to at most this L2 norm
    noisy_kmeans_rounds: int = Field(10, ge=1)  # noisy Lloyd answers per study; later rounds repeat the last
    time_horizon_days: float = Field(3650.0, gt=0)  # a noisy table's fixed time grid ends here (later: censored)
    histogram_bins: int = Field(64, ge=2)  # most bins of any intensity or score histogram the site releases
    columns: dict[str, ClinicalColumn] = Field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    radiomics_settings: tuple[str, ...] = ("default",)  # packaged settings names a study may choose
    feature_tables: tuple[str, ...] = FEATURE_TABLES  # derived/ tables a study may name (read or written)
    maps: tuple[str, ...] = DEFAULT_MAPS  # parametric maps the site fits for a study (IVIM is off: dipy's fit
    # costs about 10 ms a voxel, hours a case; list IVIM_D, IVIM_Dstar, IVIM_f to allow it)

    @property
    def cell_floor(self) -> int:
        """The smallest released cell: 1 where exact outcomes are allowed, else ``min_cell`` (or ``min_cohort``)."""
        return 1 if self.exact_outcomes else (self.min_cell or self.min_cohort)


class Scanner(BaseModel):
    """The acquisition a site's images come from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vendor: str
    model: str = ""
    field_strength: float = Field(gt=0)
    spacing: tuple[float, float, float] | None = None


class SimulatedEffects(BaseModel):
    """Ground truth of a simulated site's scanner effects (absent for real hospitals)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    intensity_scale: float
    intensity_offset: float
    bias_amplitude: float
    noise_sigma: float
    seed: int


class SiteConfig(BaseModel):
    """The contents of ``site.yaml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site_id: str = Field(min_length=1)
    name: str = ""
    scanner: Scanner | None = None  # required where the site has images
    sequences: tuple[str, ...] = ("T2w", "CET1")  # empty: a tabular site (site.yaml + clinical.csv only)
    reference_sequence: str = "T2w"
    policy: SitePolicy = SitePolicy()
    simulation: SimulatedEffects | None = None
    format: Literal["fedbiopsy-site/1"] = "fedbiopsy-site/1"

    def require_scanner(self) -> Scanner:
        """The scanner of an imaging site; a tabular site has none, and imaging steps refuse it here."""
        if self.scanner is None:
            raise ConfigError("site.yaml", "this site lists no scanner (a tabular site)",
                              "add scanner: {vendor: ..., field_strength: ...} or leave the site out of imaging phases")
        return self.scanner


def load_site_config(site_dir: Path | str) -> SiteConfig:
    """Read and validate ``site_dir/site.yaml``."""
    path = Path(site_dir) / "site.yaml"
    if not path.is_file():
        raise ConfigError(path, "site.yaml is missing", "create it (see deploy/site.example.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML ({exc})", "correct the YAML syntax") from exc
    if not isinstance(raw, dict):
        raise ConfigError(path, "the top level is not a mapping", "write `key: value` pairs")
    try:
        config = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(path, f"invalid site.yaml ({problems})", "correct the named keys") from exc
    if config.sequences and config.scanner is None:
        raise ConfigError(path, "an imaging site (sequences listed) needs its scanner",
                          "add scanner: {vendor: ..., field_strength: ...}, or set sequences: [] for a tabular site")
    if config.sequences and config.reference_sequence not in config.sequences:
        raise ConfigError(
            path,
            f"reference_sequence {config.reference_sequence!r} is not in sequences {list(config.sequences)}",
            "name one of the listed sequences",
        )
    return config


def write_site_config(config: SiteConfig, site_dir: Path | str) -> Path:
    """Write ``site.yaml`` for a config."""
    path = Path(site_dir) / "site.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Case:
    """One patient of a site: image paths per sequence, an optional mask, and the clinical row."""

    patient_id: str
    images: dict[str, Path]
    mask: Path | None
    clinical: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Site:
    """A loaded site: its config and its valid cases (see :func:`common.validation.validate_site`)."""

    root: Path
    config: SiteConfig
    cases: tuple[Case, ...]

    @property
    def site_id(self) -> str:
        return self.config.site_id

    @property
    def tabular(self) -> bool:
        """A site without images: ``site.yaml`` and ``clinical.csv`` (any columns) only."""
        return not self.config.sequences

    def clinical_frame(self) -> pd.DataFrame:
        """The clinical rows of the valid cases, indexed by patient_id (stays at the site)."""
        return pd.DataFrame([c.clinical for c in self.cases]).set_index("patient_id")


def case_paths(site_dir: Path, patient_id: str,
               sequences: tuple[str, ...]) -> tuple[dict[str, Path | None], Path | None]:
    """Where a case's images and mask are (None where no file exists)."""
    images = {seq: find_image(site_dir / "images" / patient_id, seq) for seq in sequences}
    mask = find_image(site_dir / "masks", patient_id)
    return images, mask


RATERS_DIR = "raters"


def rater_masks(site_dir: Path | str, patient_id: str) -> dict[str, Path]:
    """The further raters' masks of a case (``raters/<patient_id>/<rater>.nii.gz``), by rater name, sorted."""
    folder = Path(site_dir) / RATERS_DIR / patient_id
    if not folder.is_dir():
        return {}
    found = {p.name[: -len(".nii.gz")]: p for p in folder.glob("*.nii.gz") if p.is_file()}
    return dict(sorted(found.items()))


def read_clinical(site_dir: Path | str, required: tuple[str, ...] = CLINICAL_COLUMNS) -> pd.DataFrame:
    """``clinical.csv`` with patient_id as a string column; raises if the file or a ``required`` column is missing
    (a tabular site needs only ``patient_id``)."""
    path = Path(site_dir) / "clinical.csv"
    if not path.is_file():
        raise ConfigError(path, "clinical.csv is missing", f"write it with the columns {', '.join(CLINICAL_COLUMNS)}")
    try:
        frame = pd.read_csv(path, dtype={"patient_id": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot be parsed as CSV ({exc})", "save it as comma-separated UTF-8") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ConfigError(path, f"missing column(s) {missing}", f"add them; required: {', '.join(required)}")
    dupes = frame["patient_id"][frame["patient_id"].duplicated()]
    if len(dupes):
        raise ConfigError(path, f"patient_id repeated in {len(dupes)} row(s)", "keep one row per patient")
    return frame
