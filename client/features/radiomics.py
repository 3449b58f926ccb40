"""Radiomics of one image and mask with pyradiomics (the ``pyradiomics-bhklab`` build, imported as ``radiomics``).

:func:`extract` returns pyradiomics' own feature names (``original_glcm_JointEnergy``, ...) as plain floats, for
the seven feature classes of the study by default: shape (3D), first order, GLCM, GLRLM, GLSZM, GLDM and NGTDM
(107 features with the Original image type).

Known deviations and pitfalls, handled or documented here:

* **Kurtosis.** pyradiomics' ``firstorder_Kurtosis`` is the plain fourth standardised moment, i.e. IBSI's
  *excess* kurtosis (feature IBSI:IPH6) **plus 3**: a normal distribution scores 3 here, 0 in IBSI. The value is
  returned unchanged, so that tables stay comparable with every other pyradiomics user; subtract 3 to compare
  with IBSI reference values.
* **Complex shape features.** The shape class takes ``numpy.linalg.eigvals`` of the (symmetric) covariance of the
  ROI's voxel coordinates; where ``eigvals`` returns a complex array even for a real spectrum (reported for
  numpy >= 2.5; the installed 2.4 returns float64 for these matrices, and the tests reproduce the behaviour with a
  complex-returning ``eigvals``), Elongation, Flatness and the Major/Minor/Least axis lengths come back as
  ``complex128``. :func:`extract` converts them to ``float`` when the
  imaginary part is round-off (``|imag| <= 1e-9 * max(1, |real|)``) and raises :class:`ExtractionError`
  otherwise, never silently dropping an imaginary part.
* **Logging.** pyradiomics attaches its own stderr handler to the ``radiomics`` logger and logs every step at
  INFO. :func:`quiet_pyradiomics` removes that handler and raises the logger to WARNING, so that pyradiomics'
  warnings and errors reach fedbiopsy's own logging configuration once, and its progress chatter does not. It
  also drops the one warning pyradiomics emits on *every* case with the default (symmetrical) GLCM, "Sum Average
  = 2 * Joint Average" (a property of the feature definitions, not of the case).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from common.errors import FedBiopsyError

if TYPE_CHECKING:
    import SimpleITK

log = logging.getLogger(__name__)

FEATURE_CLASSES: tuple[str, ...] = ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
"""The study's feature classes, in the order their columns appear."""
N_DEFAULT_FEATURES = 107
"""Number of features of :data:`FEATURE_CLASSES` on the Original image (14+18+24+16+16+14+5)."""
_IMAG_TOL = 1e-9
_BENIGN = {"radiomics.glcm": ("GLCM is symmetrical, therefore Sum Average = 2 * Joint Average",)}


class ExtractionError(FedBiopsyError):
    """pyradiomics cannot compute features for this image and mask (empty ROI, label missing, bad settings)."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. Fix: {fix}")


class _DropBenign(logging.Filter):
    """Drops pyradiomics messages that say nothing about the case (see the module docstring)."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_pyradiomics(level: int = logging.WARNING) -> None:
    """Route pyradiomics' logging through fedbiopsy's: drop its own stderr handler, keep messages at ``level``+.

    Idempotent; called by :func:`extract`.
    """
    import radiomics

    logger = logging.getLogger("radiomics")
    own = getattr(radiomics, "handler", None)
    if own is not None and own in logger.handlers:
        logger.removeHandler(own)
    logger.setLevel(level)
    for name, prefixes in _BENIGN.items():
        child = logging.getLogger(name)
        if not any(isinstance(f, _DropBenign) for f in child.filters):
            child.addFilter(_DropBenign(prefixes))


@contextmanager
def captured_pyradiomics_messages(level: int = logging.WARNING) -> Iterator[list[str]]:
    """Collect pyradiomics' log messages at ``level``+ into a list instead of propagating them.

    Used by the parallel extraction, whose worker processes have no logging configuration: the messages are
    returned with each case's result and logged once by the parent.
    """
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.levelname.lower()}: {record.getMessage().strip().splitlines()[0]}")

    logger = logging.getLogger("radiomics")
    handler = _Collect(level)
    previous = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = previous


def _to_float(name: str, value: Any) -> float:
    """A pyradiomics value (numpy scalar, 0-d array, possibly complex) as a float."""
    import numpy as np

    arr = np.asarray(value)
    if arr.size != 1:
        raise ExtractionError(f"feature {name} has {arr.size} values, not one",
                              "extract segment-based features (voxelBased is not supported here)")
    scalar = arr.reshape(()).item()
    if isinstance(scalar, complex):
        if abs(scalar.imag) > _IMAG_TOL * max(1.0, abs(scalar.real)):
            raise ExtractionError(
                f"feature {name} is complex ({scalar!r}): the ROI's coordinate covariance has a complex spectrum",
                "check the mask (a degenerate or non-finite ROI) and report it with the case",
            )
        return float(scalar.real)
    return float(scalar)


def _split_settings(settings: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(pyradiomics settings, enabled image types, enabled feature classes) from one mapping."""
    flat = dict(settings or {})
    image_types = flat.pop("imageType", None) or {"Original": {}}
    classes = flat.pop("featureClass", None)
    if classes is None:
        classes = {c: [] for c in FEATURE_CLASSES}
    elif isinstance(classes, (list, tuple)):
        classes = {c: [] for c in classes}
    if not isinstance(image_types, Mapping) or not isinstance(classes, Mapping):
        raise ExtractionError("settings 'imageType'/'featureClass' are not mappings",
                              "write them as in a pyradiomics parameter file (name: {} / name: [features])")
    return flat, {str(k): dict(v or {}) for k, v in image_types.items()}, {
        str(k): (list(v) if v else []) for k, v in classes.items()}


def _fix_for(message: str) -> str:
    """The fix to suggest for one of pyradiomics' ROI or settings errors."""
    text = message.lower()
    if "not present" in text or "no labels" in text:
        return "the mask has no voxel with this label: check the label value of the segmentation"
    if "voxel" in text or "too small" in text or "dimensions" in text or "bounding box" in text:
        return ("the tumour is too small on the resampled grid: check the segmentation, or lower "
                "minimumROISize / minimumROIDimensions in the radiomics settings")
    if "geometry" in text or "size mismatch" in text:
        return "image and mask grids differ: set correctMask (or geometryTolerance) in the radiomics settings"
    return "check the radiomics settings (names and values as in pyradiomics' parameter files)"


def _order(name: str) -> tuple[str, int, str]:
    parts = name.split("_", 2)
    rank = FEATURE_CLASSES.index(parts[1]) if len(parts) == 3 and parts[1] in FEATURE_CLASSES else len(FEATURE_CLASSES)
    return parts[0], rank, name


def extract(image: SimpleITK.Image, mask: SimpleITK.Image, settings: dict | None = None,
            label: int = 1) -> dict[str, float]:
    """pyradiomics features of ``label`` in ``mask`` over ``image``, as ``{feature name: float}``.

    Parameters
    ----------
    image, mask
        A scalar image and its label map (the mask is resampled onto the image grid when ``correctMask`` is set).
    settings
        pyradiomics extraction settings passed through unchanged (``binWidth``, ``binCount``,
        ``resampledPixelSpacing``, ``interpolator``, ``normalize``, ``force2D``, ...). Two optional keys follow
        pyradiomics' parameter files: ``imageType`` (default ``{"Original": {}}``) and ``featureClass`` (a list
        of class names or ``{class: [feature, ...]}``; default: :data:`FEATURE_CLASSES`, all their features).
    label
        The mask value of the region (overrides any ``label`` in ``settings``).

    Returns
    -------
    dict
        Features in a fixed order (image type, then :data:`FEATURE_CLASSES` order, then name); diagnostics
        are left out. A feature pyradiomics fails to compute is NaN (pyradiomics logs why).

    Raises
    ------
    ExtractionError
        When the ROI is unusable (label absent, empty or single voxel after resampling, too few dimensions),
        or a setting is invalid.
    """
    quiet_pyradiomics()
    from radiomics import featureextractor

    flat, image_types, classes = _split_settings(settings)
    flat["label"] = int(label)
    flat["additionalInfo"] = False
    try:
        extractor = featureextractor.RadiomicsFeatureExtractor(**flat)
        extractor.disableAllFeatures()
        extractor.enableFeaturesByName(**classes)
        extractor.disableAllImageTypes()
        extractor.enableImageTypes(**image_types)
        raw = extractor.execute(image, mask, label=int(label))
    except (ValueError, RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise ExtractionError(f"pyradiomics could not extract label {label}: {first}", _fix_for(first)) from exc
    names = sorted((k for k in raw if not k.startswith("diagnostics_")), key=_order)
    out = {name: _to_float(name, raw[name]) for name in names}
    n_nan = sum(math.isnan(v) for v in out.values())
    if n_nan:
        log.debug("%d of %d features are NaN", n_nan, len(out))
    return out
