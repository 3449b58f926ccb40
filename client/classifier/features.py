"""The feature table a site's classifier reads: a stored table, or a compact radiomics set computed here.

Where the features come from (``classifier.features`` in the study):

* ``table``: a CSV under the site's ``derived/`` folder (the harmonised table the harmonisation phase writes,
  else the radiomics extraction's table), one row per patient, indexed by ``patient_id``;
* ``compact``: computed at the site from the images inside the tumour mask by
  :func:`client.features.radiomics.extract` with a reduced settings dict (first order and a few GLCM features,
  fixed bin *count* so that the binning does not depend on the scanner's intensity scale), cached in
  ``derived/classifier/``. ``standardise`` first normalises each image in its foreground (z-score, or Nyúl with a
  federated standard scale) with the preprocessing steps of :mod:`client.preprocessing.normalise`;
* ``auto``: the table when it exists, else ``compact``.

The table never leaves the site; only the classifier's aggregates do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from common.errors import ConfigError, SiteDataError
from common.hashing import sha256_json
from common.imageio import read_image
from common.sitedata import Case, Site

log = logging.getLogger(__name__)

COMPACT_SETTINGS: dict[str, Any] = {
    "binCount": 16,
    "featureClass": {
        "firstorder": ["Mean", "Median", "10Percentile", "90Percentile", "Variance", "Skewness", "Kurtosis",
                       "Entropy", "Uniformity", "RobustMeanAbsoluteDeviation"],
        "glcm": ["Contrast", "Correlation", "JointEntropy", "Idm", "ClusterShade"],
    },
}
"""The compact set: 15 features per sequence, fixed bin count (pyradiomics settings passed through)."""


class _DropFixedBinCount(logging.Filter):
    """pyradiomics warns on every case with a fixed bin count -- a choice made here on purpose (the binning
    must not depend on the scanner's intensity scale); the warning says nothing about the case."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Fixed bin Count enabled")


@contextmanager
def _radiomics_errors_only() -> Iterator[None]:
    """Drop pyradiomics' fixed-bin-count warning (installed once, idempotent)."""
    logger = logging.getLogger("radiomics.featureextractor")
    if not any(isinstance(f, _DropFixedBinCount) for f in logger.filters):
        logger.addFilter(_DropFixedBinCount())
    yield


def standardised_images(case: Case, sequences: Sequence[str], method: str,
                        nyul: Mapping[str, Any] | None = None) -> dict[str, sitk.Image]:
    """The case's images, normalised in their foreground (``method``: "none", "zscore" or "nyul")."""
    images = {seq: read_image(case.images[seq]) for seq in sequences}
    if method == "none":
        return images
    from client.preprocessing.base import CaseVolumes
    from client.preprocessing.normalise import NyulStandardise, ZScoreNormalise

    volumes = CaseVolumes(case.patient_id, images, None, sequences[0])
    if method == "zscore":
        return dict(ZScoreNormalise()(volumes).images)
    if method == "nyul":
        if not nyul:
            raise ConfigError("study config", "Nyúl standardisation needs the federated standard scale",
                              "learn it first (common.nyul.site_nyul / aggregate_nyul)")
        step = NyulStandardise(tuple(nyul["percentiles"]), {s: tuple(v) for s, v in nyul["landmarks"].items()})
        return dict(step(volumes).images)
    raise ConfigError("study config", f"unknown image standardisation {method!r}", "use none, zscore or nyul")


def compact_case_features(case: Case, sequences: Sequence[str], standardise: str = "none",
                          nyul: Mapping[str, Any] | None = None,
                          settings: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The compact radiomics of one case, columns prefixed by sequence (``CET1_original_glcm_Idm``)."""
    from client.features.radiomics import extract

    if case.mask is None:
        raise SiteDataError(case.patient_id, "has no tumour mask", "draw or segment the tumour first")
    mask = read_image(case.mask)
    images = standardised_images(case, sequences, standardise, nyul)
    out: dict[str, float] = {}
    with _radiomics_errors_only():
        for seq in sequences:
            m = sitk.Cast(mask > 0, sitk.sitkUInt8)
            m.CopyInformation(images[seq])
            feats = extract(images[seq], m, dict(settings or COMPACT_SETTINGS))
            out.update({f"{seq}_{k}": v for k, v in feats.items()})
    return out


def compact_features(cases: Sequence[Case], sequences: Sequence[str], standardise: str = "none",
                     nyul: Mapping[str, Any] | None = None,
                     settings: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Compact radiomics of every case (rows: patient_id)."""
    rows = {c.patient_id: compact_case_features(c, sequences, standardise, nyul, settings) for c in cases}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "patient_id"
    return frame


def compact_settings_hash(sequences: Sequence[str], standardise: str, nyul: Mapping[str, Any] | None = None,
                          settings: Mapping[str, Any] | None = None, inputs: str = "raw") -> str:
    """sha256 of everything that determines the compact features (registered with the classifier); ``inputs``:
    which images they are computed on ("raw", or the preprocessing plan's sha256)."""
    return sha256_json({"sequences": list(sequences), "standardise": standardise, "nyul": dict(nyul or {}),
                        "settings": dict(settings or COMPACT_SETTINGS), "inputs": inputs})


def read_table(path: Path) -> pd.DataFrame:
    """A feature CSV indexed by patient_id, numeric columns only."""
    frame = pd.read_csv(path, dtype={"patient_id": str})
    if "patient_id" not in frame.columns:
        raise SiteDataError(path, "has no patient_id column", "write the table with one row per patient_id")
    frame = frame.set_index("patient_id")
    return frame.select_dtypes(include=[np.number])


def site_feature_table(site: Site, source: str, tables: Sequence[str], sequences: Sequence[str], standardise: str,
                       cache_dir: Path, inputs: str = "raw") -> pd.DataFrame:
    """The site's feature table for the classifier (see the module docstring); rows follow ``site.cases``.

    ``tables``: candidate file names under the site's ``derived/`` folder, the first existing one is read.
    """
    derived = site.root / "derived"
    found = next((derived / t for t in tables if (derived / t).is_file()), None)
    if source == "table" or (source == "auto" and found is not None):
        if found is None:
            raise SiteDataError(derived / (tables[0] if tables else "features.csv"), "feature table not found",
                                "run the features/harmonisation phases first or set classifier.features: compact")
        frame = read_table(found)
        where: Path = found
    else:
        key = compact_settings_hash(sequences, standardise, inputs=inputs)[:16]
        where = cache_dir / f"compact-{key}.csv"
        if where.is_file():
            frame = read_table(where)
        else:
            frame = compact_features(site.cases, sequences, standardise)
            where.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(where)
    missing = [c.patient_id for c in site.cases if c.patient_id not in frame.index]
    if missing:
        raise SiteDataError(where, f"no features for patient(s) {missing[:5]}", "extract features for every valid case")
    return frame.loc[[c.patient_id for c in site.cases]]
