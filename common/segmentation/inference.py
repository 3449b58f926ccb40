"""The inference protocol: every site segments its cases without masks with the federated model (one round).

``segment_unlabelled`` carries the final segmentation weights and the plan; each site predicts and keeps a mask
for every case that has none (:mod:`client.steps.inference`) and answers with counts only: ``n_segmented``
and ``n_empty`` (cases where the model found no tumour). Each count is about named cases, so a site whose policy
does not allow exact outcomes sends it only when 0 or at least its ``cell_floor``, else the text ``"<k"``
(:func:`small_count`); the server reports it as sent (:func:`read_count`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.protocol import Payload, Query, pack_weights
from common.replies import Count, read_count
from common.segmentation.protocol import PLAN_KEY

log = logging.getLogger(__name__)

SEGMENT = "segment_unlabelled"
"""A released count: the number, or ``"<k"`` for one under the site's smallest cell ``k``."""


def lower_bound(count: Count) -> int:
    """The smallest number a released count stands for as a participant count (``"<k"``: 1, ``">=k"``: k)."""
    if isinstance(count, int):
        return count
    return int(count[2:]) if count.startswith(">=") else 1


@dataclass(frozen=True)
class InferenceResult:
    """Per site: the cases segmented, and those where the model found no tumour."""

    segmented: dict[str, Count]
    empty: dict[str, Count]


def inference_request(weights: Mapping[str, np.ndarray], plan: Mapping[str, Any]) -> Payload:
    """The request of the one round: the model's weights and its plan (as JSON)."""
    return {**pack_weights(weights), PLAN_KEY: json.dumps(plan)}


def run_inference(query: Query, weights: Mapping[str, np.ndarray], plan: Mapping[str, Any]) -> InferenceResult:
    """Ask every site to segment its unlabelled cases with ``weights``; the counts each one reports."""
    replies = query(SEGMENT, inference_request(weights, plan))
    result = InferenceResult(segmented={s: read_count(s, r["n_segmented"]) for s, r in sorted(replies.items())},
                             empty={s: read_count(s, r["n_empty"]) for s, r in sorted(replies.items())})
    log.info("inference: at least %d case(s) segmented at %d site(s), at least %d without a tumour found",
             sum(map(lower_bound, result.segmented.values())), len(replies),
             sum(map(lower_bound, result.empty.values())))
    return result
