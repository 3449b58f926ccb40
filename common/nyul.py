"""Nyúl histogram standardisation with landmarks learnt federatedly.

Nyúl & Udupa (1999), as in Shah et al. (2011): each image's foreground landmarks (intensity percentiles
``p_1 < ... < p_k``) are mapped linearly so that its first and last landmark land on the standard range
``[s_1, s_2]``; the *standard scale* is the mean of these mapped landmarks over the training images. An image
is then standardised by the piecewise-linear map that sends its own landmarks onto the standard scale.

Federated: the site step :func:`site_nyul` averages its cases' mapped landmarks (one vector per sequence,
never per case, and only over at least ``min_cohort`` cases); the server step :func:`aggregate_nyul` takes
the case-weighted mean of the sites' averages, which equals the pooled Nyúl standard scale exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from common.errors import PolicyError, ProtocolError
from common.protocol import Payload
from common.replies import reply_field


def case_landmarks(foreground: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """The landmarks of one image: percentiles of its foreground intensities."""
    values = np.asarray(foreground, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite foreground voxel to compute Nyúl landmarks from")
    return np.percentile(values, percentiles)


def map_to_scale(landmarks: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """An image's landmarks mapped linearly so that the first and last land on ``scale``."""
    lm = np.asarray(landmarks, dtype=np.float64)
    span = lm[-1] - lm[0]
    if not span > 0:
        raise ValueError(f"the image's landmarks span no intensity range ({lm[0]:g} to {lm[-1]:g}): constant image")
    return scale[0] + (lm - lm[0]) * (scale[1] - scale[0]) / span


def site_nyul(site_id: str, cases: Sequence[Mapping[str, np.ndarray]], sequences: Sequence[str],
              percentiles: Sequence[float], scale: tuple[float, float], min_cohort: int) -> Payload:
    """The site step: per sequence, the mean of the cases' landmarks mapped onto ``scale``.

    ``cases`` holds each case's landmarks (from :func:`case_landmarks`) by sequence; they stay at the site.
    """
    n = len(cases)
    if n < min_cohort:
        raise PolicyError(site_id, "min_cohort", f"{n} case(s) for Nyúl landmarks, policy needs at least {min_cohort}")
    out: Payload = {
        "n_cases": n,
        "percentiles": np.asarray(percentiles, dtype=np.float64),
        "scale": np.asarray(scale, dtype=np.float64),
    }
    for seq in sequences:
        mapped = np.stack([map_to_scale(np.asarray(c[seq]), scale) for c in cases])
        out[f"{seq}/landmarks"] = mapped.mean(axis=0)
    return out


def _field(site: str, reply: Mapping[str, object], key: str) -> np.ndarray:
    return reply_field(site, reply, key, "Nyúl", "check the site's images for constant volumes")


def aggregate_nyul(replies: Mapping[str, Mapping[str, object]], sequences: Sequence[str]) -> dict:
    """The server step: the standard scale per sequence, the case-weighted mean of the sites' landmarks."""
    if not replies:
        raise ProtocolError("(none)", "no site answered the Nyúl landmark query")
    sites = sorted(replies)
    pct = _field(sites[0], replies[sites[0]], "percentiles")
    scale = _field(sites[0], replies[sites[0]], "scale")
    counts = {}
    for s in sites:
        if not np.array_equal(_field(s, replies[s], "percentiles"), pct) or not np.array_equal(
                _field(s, replies[s], "scale"), scale):
            raise ProtocolError(s, "used other Nyúl percentiles or scale than the first site",
                                "send one study config to all sites")
        counts[s] = int(_field(s, replies[s], "n_cases"))
        if counts[s] < 1:
            raise ProtocolError(s, "reported no case for the Nyúl landmarks")
    total = sum(counts.values())
    landmarks: dict[str, list[float]] = {}
    for seq in sequences:
        stack = []
        for s in sites:
            lm = _field(s, replies[s], f"{seq}/landmarks")
            if lm.shape != pct.shape or np.any(np.diff(lm) < 0):
                raise ProtocolError(s, f"{seq} landmarks are not {pct.size} non-decreasing values",
                                    "run the same fedbiopsy version at every site")
            stack.append(lm * counts[s])
        landmarks[seq] = (np.sum(stack, axis=0) / total).tolist()
    return {"percentiles": pct.tolist(), "scale": scale.tolist(), "landmarks": landmarks,
            "n_cases": total, "cases_per_site": counts}


def nyul_transform(values: np.ndarray, image_landmarks: np.ndarray, standard: np.ndarray) -> np.ndarray:
    """Map intensities piecewise-linearly from the image's landmarks onto the standard scale.

    Beyond the first and last landmark the first and last segments are extended linearly. Repeated image
    landmarks (flat histograms) are separated by a negligible step so the map stays monotone.
    """
    x = np.asarray(image_landmarks, dtype=np.float64)
    y = np.asarray(standard, dtype=np.float64)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"image landmarks {x.shape} and standard scale {y.shape} must be equal-length vectors")
    span = x[-1] - x[0]
    if not span > 0:
        raise ValueError("the image's landmarks span no intensity range: constant image")
    x = np.maximum.accumulate(x + np.arange(x.size) * span * 1e-9)
    v = np.asarray(values, dtype=np.float64)
    out = np.interp(v, x, y)
    lo, hi = v < x[0], v > x[-1]
    out[lo] = y[0] + (v[lo] - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
    out[hi] = y[-1] + (v[hi] - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return out
