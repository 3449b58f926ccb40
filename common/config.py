"""The versioned study configuration: one YAML file, validated once into a frozen typed object.

Later phases add their own section models here; every section has defaults so that a minimal
study file stays valid, and unknown keys are rejected so that a typo never passes silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from common.config_base import _Frozen
from common.config_maps import MapsConfig
from common.config_outcomes import OutcomesConfig, PrognosisConfig, RadiogenomicsConfig
from common.errors import ConfigError
from common.hashing import sha256_json
from common.maps.layout import FOUR_D, is_map, study_channels

STUDY_SCHEMA_VERSION = 1
DEFAULT_STUDY = Path(__file__).with_name("studies") / "default.yaml"
__all__ = ["DEFAULT_STUDY", "STUDY_SCHEMA_VERSION", "OutcomesConfig", "PrognosisConfig", "RadiogenomicsConfig",
           "StudyConfig", "load_study_config"]


class FingerprintConfig(_Frozen):
    """What each site measures for the fingerprint phase."""

    foreground_samples_per_case: int = Field(10_000, ge=100)
    percentiles: tuple[float, ...] = (0.5, 5.0, 25.0, 50.0, 75.0, 95.0, 99.5)
    seed: int = 1234

    @field_validator("percentiles")
    @classmethod
    def _sorted_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 <= p <= 100.0 for p in v) or list(v) != sorted(v):
            raise ValueError("percentiles must be sorted values in [0, 100]")
        return v


class SimulationConfig(_Frozen):
    """The simulated hospitals used by `make demo` and the tests."""

    sites: int = Field(3, ge=1)
    patients: int = Field(12, ge=1)
    size: int = Field(64, ge=16)
    seed: int = 0
    unlabelled: int = Field(0, ge=0)  # patients per site without a mask, for the federated model to segment
    raters: int = Field(1, ge=1)  # radiologists per rated case (masks/ is rater 1; more: raters/, for the
    rated_fraction: float = Field(1.0, ge=0, le=1)  # segmentation study), and the share of labelled cases rated


class DPSGDConfig(_Frozen):
    """Patient-level DP-SGD (Opacus) inside each site's local step; the noise is sized for the whole schedule."""

    enabled: bool = False
    target_epsilon: float = Field(8.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    noise_multiplier: float | None = Field(None, gt=0)  # None: derived from target_epsilon and the schedule
    accountant: Literal["rdp", "prv"] = "rdp"


class SegmentationDPConfig(DPSGDConfig):
    """DP-SGD of the segmentation network at each site."""


class SegmentationConfig(_Frozen):
    """Federated tumour segmentation: network, schedule, strategy, reply validation, metrics and DP."""

    network: Literal["monai", "nnunet"] = "monai"
    monai_channels: tuple[int, ...] = (8, 16, 32, 64)
    monai_res_units: int = Field(1, ge=0)
    nnunet_base_features: int = Field(32, ge=4)  # nnU-Net's own defaults: 32 and 320
    nnunet_max_features: int = Field(320, ge=8)
    nnunet_gpu_memory_gb: float = Field(8.0, gt=0)
    # network nnunet: nnU-Net's own nnUNetTrainer does the local steps (its data loader and augmentation, deep
    # supervision, Dice + CE loss, SGD with poly LR over the rounds) and its predictor scores and segments;
    # false, or with DP or FedProx (clipping, the proximal term): fedbiopsy's loop with the same network
    nnunet_trainer: bool = True
    nnunet_da_processes: int = Field(0, ge=0, le=32)  # nnU-Net augmentation workers per site; 0: in the site thread
    rounds: int = Field(5, ge=1)
    local_epochs: int = Field(1, ge=1)
    steps_per_epoch: int = Field(20, ge=1)
    patch_size: tuple[int, int, int] | None = (32, 32, 32)  # None: the plan's patch size
    batch_size: int | None = Field(2, ge=1)  # None: the plan's batch size
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(3e-3, gt=0)
    lr_schedule: Literal["poly", "constant"] = "poly"  # poly: lr (1 - step / all steps) ** 0.9 over the whole study
    weight_decay: float = Field(0.0, ge=0)
    foreground_ratio: float = Field(0.5, ge=0, le=1)  # share of patches centred on tumour voxels
    augment: bool = True
    strategy: Literal["fedavg", "fedprox", "fedmedian", "trimmed"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0)
    trim_beta: float = Field(0.2, ge=0, lt=0.5)
    max_update_norm: float = Field(100.0, gt=0)  # L2 bound on (site weights - global weights)
    holdout_fraction: float = Field(0.3, gt=0, lt=1)
    evaluate_every: int = Field(1, ge=1)  # federated evaluation every n rounds (and always after the last)
    sw_overlap: float = Field(0.25, ge=0, lt=1)
    mirror: bool = True  # test-time mirroring over the 3 axes (nnU-Net's predictor): 8 predictions per case
    keep_largest: bool = True  # post-processing: the largest connected component (scored as the sites use it)
    fill_holes: bool = True  # ... with its holes closed in 3-D and on every slice (a necrotic core is tumour)
    amp: bool = True  # mixed precision, used only on CUDA and never with DP
    threads: int = Field(0, ge=0)  # torch CPU threads at a site; 0: leave torch's default
    overlays: int = Field(3, ge=0)  # PNG overlays written at the site (never sent) for this many held-out cases
    variability_tables: bool = True  # the inference phase also runs the seed's segmentation study (raters/)
    manual_seconds_per_case: float = Field(1200.0, gt=0)  # a radiologist's time per case, for the time leverage
    seed: int = 0
    dp: SegmentationDPConfig = SegmentationDPConfig()

    @property
    def local_steps(self) -> int:
        """Optimizer steps per site per round."""
        return self.local_epochs * self.steps_per_epoch


class RollcallConfig(_Frozen):
    """The roll call: rounds in which every connected site answers with its case count (deployment checks)."""

    rounds: int = Field(1, ge=1)
    pause_s: float = Field(0.0, ge=0)  # wait between rounds


class DenoiseConfig(_Frozen):
    """Non-local-means denoising (scikit-image); the filter strength h = ``strength`` x estimated noise sigma."""

    patch_size: int = Field(3, ge=3)
    patch_distance: int = Field(2, ge=1)
    strength: float = Field(0.8, gt=0)


class BiasFieldConfig(_Frozen):
    """N4 bias field correction, fitted on an image shrunk by ``shrink_factor`` for speed."""

    shrink_factor: int = Field(4, ge=1)
    iterations: tuple[int, ...] = (50, 50, 30)
    convergence: float = Field(1e-3, gt=0)
    control_points: int = Field(4, ge=4)


class ResampleConfig(_Frozen):
    """Resampling to the target spacing (mm, x y z); None: the plan's target spacing (fingerprint phase)."""

    target_spacing: tuple[float, float, float] | None = None
    interpolator: Literal["linear", "bspline"] = "linear"


class RegistrationConfig(_Frozen):
    """Rigid registration of every sequence to the reference sequence (Mattes mutual information)."""

    histogram_bins: int = Field(16, ge=8)  # 32 let the optimiser walk 5-12 mm off on denoised 1.5T phantoms
    sampling_fraction: float = Field(0.25, gt=0, le=1)
    iterations: int = Field(200, ge=1)
    shrink_factors: tuple[int, ...] = (2, 1)
    seed: int = Field(1, ge=1)  # of the metric's random sampling (SimpleITK reads 0 as "wall clock")


class NormalisationConfig(_Frozen):
    """Intensity normalisation in the foreground: z-score, percentile rescaling or federated Nyul standardisation."""

    method: Literal["nyul", "zscore", "percentile"] = "nyul"
    percentile_range: tuple[float, float] = (0.5, 99.5)
    output_range: tuple[float, float] = (0.0, 1.0)
    nyul_percentiles: tuple[float, ...] = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
    nyul_scale: tuple[float, float] = (0.0, 100.0)

    @field_validator("nyul_percentiles")
    @classmethod
    def _increasing(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) < 3 or any(not 0.0 <= p <= 100.0 for p in v) or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("nyul_percentiles must be at least 3 strictly increasing values in [0, 100]")
        return v


PreprocessingStep = Literal["denoise", "bias", "register", "resample", "normalise"]
PREPROCESSING_STEPS: tuple[PreprocessingStep, ...] = ("denoise", "bias", "register", "resample", "normalise")


class PreprocessingConfig(_Frozen):
    """Site preprocessing: which steps run, in which order (normalisation last), and each step's settings."""

    steps: tuple[PreprocessingStep, ...] = PREPROCESSING_STEPS
    denoise: DenoiseConfig = DenoiseConfig()
    bias: BiasFieldConfig = BiasFieldConfig()
    registration: RegistrationConfig = RegistrationConfig()  # settings of the `register` step
    resample: ResampleConfig = ResampleConfig()
    normalise: NormalisationConfig = NormalisationConfig()
    apply_at_sites: bool = True  # sites preprocess their cohort into derived/preprocessed/ once the plan arrives
    histogram_bins: int = Field(64, ge=8)  # of the before/after intensity histograms each site reports

    @field_validator("steps")
    @classmethod
    def _unique_normalise_last(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("each preprocessing step may appear once")
        if "normalise" in v and v[-1] != "normalise":
            raise ValueError("normalise must be the last preprocessing step")
        return v


class FeaturesConfig(_Frozen):
    """Radiomics at each site (they never leave it): the settings YAML and the worker processes.

    ``settings`` is a packaged settings name (``common/features/settings_files/<name>.yaml``) or a path to a YAML.
    """

    settings: str = "default"
    workers: int = Field(2, ge=1)


class RegistryConfig(_Frozen):
    """Where the server's model registry lives (server/registry/), and the intended use its model cards state.

    ``folder``: the registry folder (artifact store, and the SQLite database unless ``url`` is set); empty:
    ``<result_dir>/../registry``; a relative folder is relative to the ServerApp's working directory.
    ``url``: a SQLAlchemy database URL (e.g. PostgreSQL); empty: ``<folder>/registry.sqlite``.
    """

    folder: str = ""
    url: str = ""
    intended_use: str = ""


class HarmonisationConfig(_Frozen):
    """Federated ComBat (neuroCombat's options) on each site's feature table, covariates from clinical.csv.

    ``batch``: a clinical.csv column holding the batch (e.g. the scanner model); None: each site is one batch.
    Files are names inside the site's ``derived/`` folder.
    """

    features_file: str = "features.csv"
    output_file: str = "features_harmonised.csv"
    batch: str | None = None
    categorical: tuple[str, ...] = ()
    continuous: tuple[str, ...] = ()
    eb: bool = True
    parametric: bool = True
    mean_only: bool = False
    ref_batch: str | None = None

    @field_validator("features_file", "output_file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or Path(v).name != v or v in (".", ".."):
            raise ValueError("must be a plain file name inside the site's derived/ folder")
        return v


class ReductionConfig(_Frozen):
    """Federated feature reduction to the image-based signature (low variance, correlation, factor analysis)."""

    input_file: str = "features_harmonised.csv"
    scores_file: str = "signature_scores.csv"
    variance_threshold: float = Field(0.0, ge=0)
    correlation_threshold: float = Field(0.95, gt=0, le=1)
    n_factors: int = Field(5, ge=1)
    fa_tol: float = Field(1e-2, gt=0)
    fa_max_iter: int = Field(1000, ge=1)

    @field_validator("input_file", "scores_file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or Path(v).name != v or v in (".", ".."):
            raise ValueError("must be a plain file name inside the site's derived/ folder")
        return v


class ClassifierDPConfig(DPSGDConfig):
    """DP-SGD of the feature classifiers at each site; sized for the whole schedule."""

    batch_size: int = Field(8, ge=1)  # distinct patients per private step (sampling rate batch / cases)


class ClassifierConfig(_Frozen):
    """Federated diagnosis models: feature classifiers (logistic, MLP) and a 3D image classifier on crops.

    ``features``: ``auto`` reads the site's harmonised table (``harmonisation.output_file``), else its radiomics
    table (``harmonisation.features_file``), else computes the compact radiomics set; ``table`` requires one of
    the tables; ``compact`` always computes it (after ``standardise`` of the images). Feature models train by
    FedAvg with ``local_steps`` full-batch gradient steps per round (1: exactly pooled gradient descent).
    """

    models: tuple[Literal["logistic", "mlp", "image"], ...] = ("logistic",)
    label: str = "label"
    features: Literal["auto", "table", "compact"] = "auto"
    standardise: Literal["none", "zscore", "nyul"] = "none"
    holdout_fraction: float = Field(0.3, gt=0, lt=1)
    evaluate_every: int = Field(1, ge=1)  # federated evaluation every n rounds (and always after the last)
    rounds: int = Field(100, ge=1)
    local_steps: int = Field(1, ge=1)
    lr: float = Field(0.5, gt=0)  # feature models: the largest step; with auto_lr capped at 1 / curvature bound
    auto_lr: bool = True  # cap lr by the pooled feature correlation (common.classifier.training.step_size)
    l2: float = Field(1e-2, ge=0)  # penalty (l2 / 2) ||w||^2 on the weights (not the biases)
    mlp_hidden: int = Field(16, ge=1)
    image_rounds: int = Field(5, ge=1)
    image_local_steps: int = Field(8, ge=1)
    image_lr: float = Field(3e-3, gt=0)
    image_batch_size: int = Field(4, ge=1)
    crop_size: int = Field(16, ge=8)
    image_channels: tuple[int, ...] = (8, 16, 32, 64)
    gradcam_layer: str = "layer1"  # full resolution: its maps localise (tests/classifier/test_image_gradcam.py)
    gradcam_overlays: int = Field(3, ge=0)  # PNGs written at the site (never sent)
    score_bins: int = Field(20, ge=2)  # shared histogram bins of the scores (even: 0.5 is an edge)
    calibration_bins: int = Field(10, ge=1)
    bootstrap: int = Field(200, ge=0)
    shap: bool = True
    shap_nsamples: int = Field(256, ge=16)  # KernelExplainer evaluations per case (MLP)
    fairness_attributes: tuple[str, ...] = ("sex",)  # clinical.csv columns evaluated per level at each site
    max_update_norm: float = Field(1e6, gt=0)
    threads: int = Field(1, ge=0)  # torch CPU threads at a site (small models: 1 is fastest); 0: torch's default
    seed: int = 0
    dp: ClassifierDPConfig = ClassifierDPConfig()

    @field_validator("score_bins")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("score_bins must be even so that the threshold 0.5 is a bin edge")
        return v

    def model_post_init(self, __context: Any) -> None:
        if self.score_bins % self.calibration_bins:
            raise ValueError(f"calibration_bins {self.calibration_bins} must divide score_bins {self.score_bins}")


class HarmonisationExperimentConfig(_Frozen):
    """The harmonisation-effect experiment (``fedbiopsy experiment harmonisation``): simulated sites whose
    scanners confound a subtype, and the classifier under each harmonisation condition."""

    sites: int = Field(4, ge=2)
    patients: int = Field(40, ge=4)
    size: int = Field(32, ge=24)
    seed: int = 0
    conditions: tuple[Literal["none", "image", "combat", "both"], ...] = ("none", "image", "combat", "both")
    image_standardisation: Literal["zscore", "nyul"] = "zscore"
    model: Literal["logistic", "mlp"] = "logistic"
    enhancement: float = 0.22
    t2_shift: float = 0.08
    biological_sd: float = Field(0.07, ge=0)
    prevalence_1_5t: float = Field(0.7, ge=0, le=1)
    prevalence_3t: float = Field(0.3, ge=0, le=1)
    cet1_gain_1_5t: float = Field(0.85, gt=0)
    scanner_strength: float = Field(1.0, ge=0)
    combat_eb: bool = True
    combat_parametric: bool = True
    workers: int = Field(1, ge=1)


class StudyConfig(_Frozen):
    """One federated study: which sequences, phases and settings, under one hash."""

    schema_version: int = STUDY_SCHEMA_VERSION
    name: str = "fedbiopsy-study"
    seed: int = 0
    sequences: tuple[str, ...] = ("T2w", "CET1")
    reference_sequence: str = "T2w"
    phases: tuple[str, ...] = ("fingerprint",)
    min_sites: int = Field(2, ge=1)
    round_timeout_s: float = Field(600.0, gt=0)
    fingerprint: FingerprintConfig = FingerprintConfig()
    harmonisation: HarmonisationConfig = HarmonisationConfig()
    reduction: ReductionConfig = ReductionConfig()
    outcomes: OutcomesConfig = OutcomesConfig()
    prognosis: PrognosisConfig = PrognosisConfig()
    radiogenomics: RadiogenomicsConfig = RadiogenomicsConfig()
    features: FeaturesConfig = FeaturesConfig()
    preprocessing: PreprocessingConfig = PreprocessingConfig()
    simulation: SimulationConfig = SimulationConfig()
    registry: RegistryConfig = RegistryConfig()
    rollcall: RollcallConfig = RollcallConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    experiment: HarmonisationExperimentConfig = HarmonisationExperimentConfig()
    maps: MapsConfig = MapsConfig()

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v > STUDY_SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is newer than this fedbiopsy understands ({STUDY_SCHEMA_VERSION}); "
                "upgrade fedbiopsy"
            )
        return v

    def model_post_init(self, __context: Any) -> None:
        if self.sequences and self.reference_sequence not in self.sequences:  # none: a tabular study
            raise ValueError(
                f"reference_sequence {self.reference_sequence!r} is not one of sequences {list(self.sequences)}"
            )
        self.maps.check_sequences(self.sequences, self.reference_sequence)

    @property
    def channels(self) -> tuple[str, ...]:
        """The study's 3D channels: its sequences with each 4D one (DWI, DCE) replaced by its maps."""
        return study_channels(self.sequences, {s: self.maps.of(s) for s in FOUR_D})

    @property
    def intensity_sequences(self) -> tuple[str, ...]:
        """The channels in scanner units (acquired 3D sequences): the ones intensity steps and the image models
        use; parametric maps are quantitative and skip denoising, bias correction and normalisation."""
        return tuple(c for c in self.channels if not is_map(c))

    @property
    def four_d(self) -> tuple[str, ...]:
        """The study's 4D sequences."""
        return tuple(s for s in self.sequences if s in FOUR_D)

    def hashed_content(self) -> dict[str, Any]:
        """The configuration that :attr:`hash` covers: all of it but where the registry lives (operational only),
        so that moving the registry does not invalidate the sites' approvals of the study."""
        exclude: dict[str, Any] = {"registry": {"folder", "url"}}
        if not self.four_d:
            exclude["maps"] = True  # no effect without a 4D sequence: a 3D study keeps its hash
        return self.model_dump(mode="json", exclude=exclude)

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of :meth:`hashed_content`."""
        return sha256_json(self.hashed_content())


def load_study_config(path: Path | str | None = None, **overrides: Any) -> StudyConfig:
    """Load and validate a study YAML (the packaged default when ``path`` is None).

    ``overrides`` replace top-level keys (e.g. ``phases=("fingerprint",)``) before validation.
    """
    src = Path(path) if path else DEFAULT_STUDY
    try:
        raw = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(src, "study config not found", "pass an existing YAML file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(src, f"not valid YAML ({exc})", "correct the YAML syntax") from exc
    if not isinstance(raw, dict):
        raise ConfigError(src, "the top level is not a mapping", "write `key: value` pairs")
    raw.update(overrides)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(src, f"invalid study config ({problems})", "correct the named keys") from exc
