"""The inference protocol: every site segments its cases without masks with the federated model (one round).

``segment_unlabelled`` carries the final segmentation weights and the plan; each site predicts and keeps a mask
for every case that has none (:mod:`client.steps.inference`) and answers with counts only: ``n_segmented``
and ``n_empty`` (cases where the model found no tumour).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.protocol import Payload, Query, pack_weights
from common.segmentation.protocol import PLAN_KEY

log = logging.getLogger(__name__)

SEGMENT = "segment_unlabelled"


@dataclass(frozen=True)
class InferenceResult:
    """Per site: the cases segmented, and those where the model found no tumour."""

    segmented: dict[str, int]
    empty: dict[str, int]


def inference_request(weights: Mapping[str, np.ndarray], plan: Mapping[str, Any]) -> Payload:
    """The request of the one round: the model's weights and its plan (as JSON)."""
    return {**pack_weights(weights), PLAN_KEY: json.dumps(plan)}


def run_inference(query: Query, weights: Mapping[str, np.ndarray], plan: Mapping[str, Any]) -> InferenceResult:
    """Ask every site to segment its unlabelled cases with ``weights``; the counts each one reports."""
    replies = query(SEGMENT, inference_request(weights, plan))
    result = InferenceResult(segmented={s: int(r["n_segmented"]) for s, r in sorted(replies.items())},  # type: ignore[call-overload]
                             empty={s: int(r["n_empty"]) for s, r in sorted(replies.items())})  # type: ignore[call-overload]
    log.info("inference: %d case(s) segmented at %d site(s), %d without a tumour found",
             sum(result.segmented.values()), len(replies), sum(result.empty.values()))
    return result
