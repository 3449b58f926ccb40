"""The per-case work of a radiomics table, in a module light enough for worker processes to import quickly
(no pandas): read a case's images and mask, extract every sequence, return features or the reason for none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.errors import FedBiopsyError

PRELOAD: tuple[str, ...] = ("__main__", "client.features.worker", "client.features.radiomics", "common.imageio",
                            "radiomics", "radiomics.featureextractor")
"""What a fork server imports once so that its forked workers start warm (``__main__`` too, as multiprocessing
does by default: otherwise every worker would re-run the main module)."""


@dataclass(frozen=True)
class CaseJob:
    """What a worker needs for one case (plain, picklable data)."""

    patient_id: str
    images: dict[str, str]  # sequence -> image path, in column order
    mask: str | None
    settings: dict[str, dict[str, Any]]  # sequence -> extract() settings
    label: int


@dataclass(frozen=True)
class CaseResult:
    """One case's features, or why it has none, and pyradiomics' messages on it."""

    patient_id: str
    features: dict[str, float] | None
    reason: str | None = None
    messages: tuple[str, ...] = ()


def extract_case(job: CaseJob) -> CaseResult:
    """All sequences of one case; any failure (unreadable file, unusable ROI) becomes the case's reason."""
    from client.features.radiomics import captured_pyradiomics_messages, extract
    from common.imageio import read_image

    if job.mask is None:
        return CaseResult(job.patient_id, None, "no tumour mask (segment the case first, then extract features)")
    row: dict[str, float] = {}
    with captured_pyradiomics_messages() as messages:
        try:
            mask = read_image(job.mask)
            for seq, path in job.images.items():
                try:
                    values = extract(read_image(path), mask, job.settings[seq], label=job.label)
                except FedBiopsyError as err:
                    return CaseResult(job.patient_id, None, f"{seq} ({path}): {err}", tuple(messages))
                row.update((f"{seq}_{name}", value) for name, value in values.items())
        except FedBiopsyError as err:
            return CaseResult(job.patient_id, None, str(err), tuple(messages))
    return CaseResult(job.patient_id, row, None, tuple(messages))


def init_worker() -> None:
    """Worker process set-up: pyradiomics' logging routed and quiet."""
    from client.features.radiomics import quiet_pyradiomics

    quiet_pyradiomics()
