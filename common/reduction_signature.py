"""The image-based signature of the feature reduction: its settings, the pooled statistics it is fitted on, and
the fitted signature (kept features, pooled correlations, varimax loadings) that scores patients and is stored.

:meth:`Signature.scores` gives a patient's factor scores (scikit-learn's ``FactorAnalysis.transform``);
sites compute them locally in the ``signature_scores`` round. How the signature is fitted is
:mod:`common.reduction_fit`; the protocol that pools the statistics is :mod:`common.reduction`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import FedBiopsyError
from common.protocol import Payload

SIGNATURE_FORMAT = "fedbiopsy-signature/1"


class ReductionError(FedBiopsyError, ValueError):
    """Settings or pooled statistics with which the reduction cannot run."""


@dataclass(frozen=True)
class ReductionSettings:
    """Thresholds of the reduction and the factor analysis' stopping rule (scikit-learn's defaults)."""

    variance_threshold: float = 0.0
    correlation_threshold: float = 0.95
    n_factors: int = 5
    fa_tol: float = 1e-2
    fa_max_iter: int = 1000

    def __post_init__(self) -> None:
        if self.variance_threshold < 0 or not 0 < self.correlation_threshold <= 1 or self.n_factors < 1:
            raise ReductionError(f"invalid reduction settings {self}: need variance_threshold >= 0, "
                                 "0 < correlation_threshold <= 1, n_factors >= 1")


@dataclass(frozen=True)
class PooledStats:
    """Pooled count, means and centred crossproduct matrix of the features."""

    features: tuple[str, ...]
    n: int
    mean: np.ndarray
    cross: np.ndarray

    @property
    def variance(self) -> np.ndarray:
        """Population variance (ddof 0), as scikit-learn's VarianceThreshold."""
        return np.diag(self.cross) / self.n

    def correlation(self, idx: np.ndarray) -> np.ndarray:
        """The pooled Pearson correlation matrix of the features ``idx``."""
        c = self.cross[np.ix_(idx, idx)]
        d = np.sqrt(np.diag(c))
        r = c / np.outer(d, d)
        np.fill_diagonal(r, 1.0)
        return r


@dataclass(frozen=True)
class Signature:
    """The image-based signature: kept features, pooled correlations, factor loadings.

    Unpacks as ``kept, correlation, loadings = signature``.
    """

    settings: ReductionSettings
    n_cases: int
    features: tuple[str, ...]  # every input feature
    dropped: dict[str, str]  # feature -> why it was dropped
    correlation: pd.DataFrame  # over the features that passed the variance filter
    loadings: pd.DataFrame  # kept features x factors (varimax-rotated)
    noise_variance: pd.Series  # kept features
    mean: pd.Series  # pooled mean of the kept features
    std: pd.Series  # pooled population sd of the kept features
    n_iter: int = 0

    @property
    def kept(self) -> list[str]:
        """The features the signature keeps (the rows of ``loadings``)."""
        return list(self.loadings.index)

    def __iter__(self) -> Iterator[object]:
        return iter((self.kept, self.correlation, self.loadings))

    def scores(self, table: pd.DataFrame) -> pd.DataFrame:
        """Factor scores of patients (rows): scikit-learn's ``FactorAnalysis.transform`` on standardised data."""
        missing = [f for f in self.kept if f not in table.columns]
        if missing:
            raise ReductionError(f"feature(s) {missing[:10]} of the signature are missing from the table")
        z = (table[self.kept].to_numpy(dtype=np.float64) - self.mean.to_numpy()) / self.std.to_numpy()
        comp = self.loadings.to_numpy().T  # factors x features
        wpsi = comp / self.noise_variance.to_numpy()
        cov_z = np.linalg.inv(np.eye(comp.shape[0]) + wpsi @ comp.T)
        return pd.DataFrame((z @ wpsi.T) @ cov_z, index=table.index, columns=list(self.loadings.columns))

    # ----------------------------------------------------------------------------- wire and storage

    def _meta(self) -> str:
        return json.dumps({"format": SIGNATURE_FORMAT, "settings": asdict(self.settings), "n_cases": self.n_cases,
                           "features": list(self.features), "dropped": self.dropped,
                           "correlated": list(self.correlation.index), "kept": self.kept,
                           "factors": list(self.loadings.columns), "n_iter": self.n_iter}, sort_keys=True)

    def to_payload(self) -> Payload:
        """What the server broadcasts so that sites can score their patients (no correlation matrix)."""
        return {"signature": self._meta(), "loadings": self.loadings.to_numpy(),
                "noise_variance": self.noise_variance.to_numpy(), "mean": self.mean.to_numpy(),
                "std": self.std.to_numpy()}

    @classmethod
    def from_payload(cls, payload: Mapping[str, object], correlation: np.ndarray | None = None) -> Signature:
        """The signature that :meth:`to_payload` sent (correlations NaN unless given)."""
        meta = json.loads(str(payload["signature"]))
        if meta.get("format") != SIGNATURE_FORMAT:
            raise ReductionError(f"not a {SIGNATURE_FORMAT} signature (format {meta.get('format')!r})")
        kept, factors, corr_names = meta["kept"], meta["factors"], meta["correlated"]
        corr = np.full((len(corr_names), len(corr_names)), np.nan) if correlation is None else correlation
        return cls(
            settings=ReductionSettings(**meta["settings"]), n_cases=int(meta["n_cases"]),
            features=tuple(meta["features"]), dropped=dict(meta["dropped"]),
            correlation=pd.DataFrame(corr, index=corr_names, columns=corr_names),
            loadings=pd.DataFrame(np.asarray(payload["loadings"], dtype=np.float64), index=kept, columns=factors),
            noise_variance=pd.Series(np.asarray(payload["noise_variance"], dtype=np.float64), index=kept),
            mean=pd.Series(np.asarray(payload["mean"], dtype=np.float64), index=kept),
            std=pd.Series(np.asarray(payload["std"], dtype=np.float64), index=kept), n_iter=int(meta["n_iter"]),
        )

    def save(self, path: Path | str) -> Path:
        """Write the signature as one ``.npz`` (arrays + JSON metadata; no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = self.to_payload()
        with path.open("wb") as fh:
            np.savez(fh, meta=np.array(payload.pop("signature")), correlation=self.correlation.to_numpy(),
                     **payload)  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: Path | str) -> Signature:
        """Read a signature written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as data:
            payload = {k: data[k] for k in data.files if k not in ("meta", "correlation")}
            payload["signature"] = str(data["meta"])
            return cls.from_payload(payload, correlation=data["correlation"])

