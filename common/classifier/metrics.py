"""Classifier metrics computed exactly from what sites may send: per-class score histograms on a shared binning.

The protocol
------------
Every site scores its own held-out cases and keeps the predictions. It sends, for a binning of [0, 1] into
``bins`` equal-width bins shared by all sites (``bins`` even, so that the decision threshold 0.5 is a bin edge):

* ``counts`` (2 x bins): how many negative (row 0) and positive (row 1) cases have their score in each bin;
* ``psum`` (2 x bins): the sum of those cases' scores (for the reliability diagram and mean confidence);
* ``brier``: the sum of squared errors ``(p - y)^2`` over its cases;
* ``boot_counts`` (B x 2 x bins) and ``boot_brier`` (B): the same aggregates for ``B`` bootstrap resamples of
  its own predictions (drawn with its own seeded generator), for confidence intervals.

What the server computes from them, and how exactly:

* **AUC** (Mann-Whitney) of the scores *quantised to the shared binning*, exactly: a positive beats every
  negative in a lower bin and ties (counts 1/2) with those in its own bin. Summing the sites' histograms gives
  the pooled histogram, so the pooled AUC equals scikit-learn's ``roc_auc_score`` on the concatenated binned
  scores. It differs from the AUC of the raw scores only by pairs of cases of opposite class whose scores share
  a bin (each such pair moves the AUC by at most ``1/(2 P N)``); a finer binning shrinks that gap and reveals more.
* **Accuracy, sensitivity, specificity** at threshold 0.5 (``p >= 0.5`` is positive), exactly, since 0.5 is an
  edge: the confusion counts are partial sums of the histograms.
* **Brier score** exactly (summed squared errors over summed counts), **reliability** per group of bins
  (mean predicted score = psum / count, observed rate = positives / count) exactly, and the mean confidence
  ``max(p, 1 - p)`` exactly (again because 0.5 is an edge).
* **Confidence intervals**: a site's CI is the percentile interval of the metric over its ``B`` replicates. The
  pooled CI is the percentile interval over ``B`` pooled replicates, replicate ``b`` being the sum of every
  site's replicate ``b``: this *is* a bootstrap of the pooled sample stratified by site (each site resampled
  with its own size), computed without any prediction leaving a site. Groups (vendor, field strength) pool the
  replicates of their sites the same way.

Privacy: a histogram is a distribution over a site's whole held-out cohort (at least ``min_cohort`` cases,
else the site refuses); no case is linked to an identifier. The model (and so every score) is the server's
choice: a model reading one feature turns the scores of a bin holding one case into that case's feature. So,
unless the site's policy allows exact outcomes (``cell_floor`` 1, the protocol above exactly), the site
releases **cells**, not bins (:func:`release_segments`): adjacent bins are merged until every cell holds 0 or
at least ``cell_floor`` cases (of every part of every fairness partition sent with it, the complement of the
released strata included), keeping 0.5 as a cell edge where each half allows it (else the confusion counts
are those of the merged cell's representative bin). A cell's cases are all counted in one representative
bin (the bin of their mean score) with their score sum split between the classes by count (the server only
ever uses the sum over both classes); the bootstrap resamples cases *with their cell and the cell's mean
squared error*, from a seed the server cannot predict (it is keyed by the site's held-out data), so the
replicates are a random function of the released cells alone. The number of bins is bounded by the site's
``histogram_bins``. What remains: a cell's class counts (e.g. one positive among five) and the Brier sum over
the whole cohort; two evaluations of models that differ for one case differ by that case's contribution --
a cross-query (differencing) risk the site's release ledger, not one reply, has to bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import PolicyError, ProtocolError
from common.protocol import Payload

METRICS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "brier")
"""The metrics reported for every site, group and the pool (each with a bootstrap CI)."""


def check_bins(bins: int) -> int:
    """``bins`` if it is an even number >= 2 (0.5 must be a bin edge), else ValueError."""
    if bins < 2 or bins % 2:
        raise ValueError(f"score bins must be an even number >= 2 (0.5 must be an edge), got {bins}")
    return bins


def bin_index(scores: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each score: ``[e_b, e_{b+1})``, the last bin closed; scores are clipped to [0, 1]."""
    check_bins(bins)
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    return np.minimum((s * bins).astype(np.int64), bins - 1)


@dataclass(frozen=True)
class ScoreSummary:
    """Aggregates of one set of scored cases (a site, a group, the pool, or one bootstrap replicate)."""

    counts: np.ndarray  # (2, bins): negatives, positives per score bin
    psum: np.ndarray  # (2, bins): sum of scores per class and bin
    brier: float  # sum of (p - y)^2

    @classmethod
    def of(cls, scores: np.ndarray, labels: np.ndarray, bins: int) -> ScoreSummary:
        """The aggregates of scored cases (stays at the site until summed)."""
        s = np.asarray(scores, dtype=np.float64)
        y = np.asarray(labels).astype(np.int64)
        if s.shape != y.shape or s.ndim != 1:
            raise ValueError(f"scores {s.shape} and labels {y.shape} must be equal-length vectors")
        if np.any((y != 0) & (y != 1)):
            raise ValueError("labels must be 0 or 1")
        idx = bin_index(s, bins)
        counts = np.zeros((2, bins), dtype=np.int64)
        psum = np.zeros((2, bins), dtype=np.float64)
        np.add.at(counts, (y, idx), 1)
        np.add.at(psum, (y, idx), s)
        return cls(counts, psum, float(np.square(s - y).sum()))

    def __add__(self, other: ScoreSummary) -> ScoreSummary:
        return ScoreSummary(self.counts + other.counts, self.psum + other.psum, self.brier + other.brier)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def bins(self) -> int:
        return int(self.counts.shape[1])


def auc_from_counts(counts: np.ndarray) -> float:
    """Mann-Whitney AUC of binned scores (ties within a bin count 1/2); NaN without both classes."""
    neg = np.asarray(counts[0], dtype=np.float64)
    pos = np.asarray(counts[1], dtype=np.float64)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return math.nan
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def confusion(counts: np.ndarray) -> dict[str, int]:
    """tp, fp, tn, fn at threshold 0.5 (``p >= 0.5`` positive)."""
    half = counts.shape[1] // 2
    return {"tp": int(counts[1, half:].sum()), "fn": int(counts[1, :half].sum()),
            "fp": int(counts[0, half:].sum()), "tn": int(counts[0, :half].sum())}


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def metrics_of(summary: ScoreSummary) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity, Brier score, n, prevalence, mean confidence of a summary."""
    c = confusion(summary.counts)
    n = summary.n
    half = summary.bins // 2
    conf_sum = summary.psum[:, half:].sum() + (summary.counts[:, :half].sum() - summary.psum[:, :half].sum())
    return {
        "auc": auc_from_counts(summary.counts),
        "accuracy": _ratio(c["tp"] + c["tn"], n),
        "sensitivity": _ratio(c["tp"], c["tp"] + c["fn"]),
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "brier": _ratio(summary.brier, n),
        "n": float(n),
        "prevalence": _ratio(float(summary.counts[1].sum()), n),
        "confidence": _ratio(float(conf_sum), n),
    }


def reliability(summary: ScoreSummary, groups: int = 10) -> dict[str, list[float]]:
    """The reliability diagram: per group of adjacent bins, cases, mean predicted score, observed rate."""
    if summary.bins % groups:
        raise ValueError(f"{groups} calibration bins do not divide the {summary.bins} score bins")
    width = summary.bins // groups
    counts = summary.counts.reshape(2, groups, width).sum(axis=2)
    psum = summary.psum.reshape(2, groups, width).sum(axis=2)
    total = counts.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.where(total > 0, psum.sum(axis=0) / total, np.nan)
        observed = np.where(total > 0, counts[1] / total, np.nan)
    lo = np.arange(groups) / groups
    return {"bin_low": lo.tolist(), "bin_high": (lo + 1.0 / groups).tolist(), "n": total.tolist(),
            "predicted": predicted.tolist(), "observed": observed.tolist()}


def bootstrap_summaries(scores: np.ndarray, labels: np.ndarray, bins: int, n_boot: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_boot`` resamples (with replacement, same size) of a site's predictions: (B, 2, bins) counts, (B,) brier."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    n = s.size
    counts = np.zeros((n_boot, 2, bins), dtype=np.int64)
    brier = np.zeros(n_boot, dtype=np.float64)
    idx_bin = bin_index(s, bins)
    err = np.square(s - y)
    for b in range(n_boot):
        take = rng.integers(0, n, n)
        np.add.at(counts[b], (y[take], idx_bin[take]), 1)
        brier[b] = float(err[take].sum())
    return counts, brier


Segment = tuple[int, int]
"""A released cell: bins ``start`` to ``end - 1`` of the shared binning."""


def _cell_ok(table: np.ndarray, seg: Segment, floor: int) -> bool:
    """Every row (part) of ``table`` holds 0 or at least ``floor`` cases over the bins of ``seg``."""
    tot = table[:, seg[0]:seg[1]].sum(axis=1)
    return bool(np.all((tot == 0) | (tot >= floor)))


def _split(table: np.ndarray, lo: int, hi: int, floor: int) -> list[Segment]:
    """Greedy cells over bins ``lo..hi-1``: close a cell as soon as it is releasable; a remainder joins the
    previous cells until releasable (or the whole range is one cell)."""
    segs: list[Segment] = []
    start = lo
    for j in range(lo, hi):
        if table[:, start:j + 1].sum() > 0 and _cell_ok(table, (start, j + 1), floor):
            segs.append((start, j + 1))
            start = j + 1
    if start < hi:
        segs = [*segs[:-1], (segs[-1][0], hi)] if segs else [(lo, hi)]
    while len(segs) > 1 and not _cell_ok(table, segs[-1], floor):
        segs = [*segs[:-2], (segs[-2][0], segs[-1][1])]
    return segs


def release_segments(idx: np.ndarray, bins: int, partitions: Sequence[np.ndarray], floor: int) -> list[Segment]:
    """The cells a site releases: adjacent score bins merged until every part of every partition holds 0 or at
    least ``floor`` of its cases in each cell, keeping 0.5 (bin ``bins // 2``) as an edge where possible.

    ``idx`` is each case's bin; each partition gives each case's part (e.g. 0 for every case: the cohort; or a
    stratum level, the unreleased levels as one part). Raises ValueError when some part has fewer than
    ``floor`` cases in all (no merging can help).
    """
    rows = []
    for part in partitions:
        p = np.asarray(part, dtype=np.int64)
        table = np.zeros((int(p.max(initial=0)) + 1, bins), dtype=np.int64)
        np.add.at(table, (p, idx), 1)
        rows.append(table)
    table = np.vstack(rows) if rows else np.zeros((1, bins), dtype=np.int64)
    half = bins // 2
    segs = _split(table, 0, half, floor) + _split(table, half, bins, floor)
    while True:
        bad = next((i for i, seg in enumerate(segs) if not _cell_ok(table, seg, floor)), None)
        if bad is None:
            return segs
        if len(segs) == 1:
            raise ValueError(f"a part holds fewer than {floor} cases; no cells can be released")
        other = bad - 1 if (bad == len(segs) - 1 or segs[bad][0] >= half) else bad + 1
        a, b = sorted((bad, other))
        segs = [*segs[:a], (segs[a][0], segs[b][1]), *segs[b + 1:]]


@dataclass(frozen=True)
class Cells:
    """Each case's released bin (its cell's representative bin) and squared error (its cell's mean)."""

    bin: np.ndarray
    err: np.ndarray


def coarsen(scores: np.ndarray, labels: np.ndarray, bins: int, segments: Sequence[Segment]
            ) -> tuple[ScoreSummary, Cells]:
    """The released summary on ``segments``: per cell, the class counts in the bin of the cell's mean score,
    the cell's score sum split by class counts; the Brier sum over all cases."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    idx = bin_index(s, bins)
    err = np.square(s - y)
    counts = np.zeros((2, bins), dtype=np.int64)
    psum = np.zeros((2, bins), dtype=np.float64)
    rep = np.zeros(s.size, dtype=np.int64)
    cell_err = np.zeros(s.size, dtype=np.float64)
    for start, end in segments:
        sel = (idx >= start) & (idx < end)
        c = int(sel.sum())
        if not c:
            continue
        mean = float(s[sel].sum()) / c
        r = int(np.clip(bin_index(np.array([mean]), bins)[0], start, end - 1))
        rep[sel], cell_err[sel] = r, float(err[sel].sum()) / c
        for cls in (0, 1):
            k = int((sel & (y == cls)).sum())
            counts[cls, r] = k
            psum[cls, r] = k * mean
    return ScoreSummary(counts, psum, float(err.sum())), Cells(rep, cell_err)


def check_score_bins(site_id: str, bins: int, max_bins: int | None) -> None:
    """Refuse (rule ``histogram_bins``) more score bins than the site's policy releases."""
    if max_bins is not None and bins > max_bins:
        raise PolicyError(site_id, "histogram_bins",
                          f"the study asks for {bins} score bins, the site's policy releases at most {max_bins}")


def site_evaluation(site_id: str, scores: np.ndarray, labels: np.ndarray, *, bins: int, n_boot: int, seed: int,
                    min_cohort: int, cell_floor: int = 1, max_bins: int | None = None,
                    segments: Sequence[Segment] | None = None) -> Payload:
    """The site step: aggregates of its held-out predictions and of ``n_boot`` bootstrap resamples.

    Refuses (:class:`PolicyError`) below ``min_cohort`` cases and above ``max_bins`` score bins. With
    ``cell_floor`` 1 the bins are released as they are; above, the released cells are ``segments`` (default:
    :func:`release_segments` of these cases alone) and the bootstrap draws cells (see the module docstring).
    """
    check_score_bins(site_id, bins, max_bins)
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.size < min_cohort:
        raise PolicyError(site_id, "min_cohort", f"{s.size} held-out case(s) to evaluate, policy needs {min_cohort}")
    if not np.all(np.isfinite(s)):
        raise ProtocolError(site_id, "the model produced non-finite scores", "check the model and the features")
    if cell_floor <= 1:
        summary = ScoreSummary.of(s, y, bins)
        boot_counts, boot_brier = bootstrap_summaries(s, y, bins, n_boot, np.random.default_rng(seed))
    else:
        ScoreSummary.of(s, y, bins)  # checks the shapes and labels
        if s.size < cell_floor:
            raise PolicyError(site_id, "min_cell",
                              f"{s.size} held-out case(s) to evaluate, the policy's smallest cell is {cell_floor}")
        segs = list(segments) if segments is not None else \
            release_segments(bin_index(s, bins), bins, [np.zeros(s.size, dtype=np.int64)], cell_floor)
        summary, cells = coarsen(s, y, bins, segs)
        boot_counts, boot_brier = _bootstrap_cells(cells, np.asarray(y).astype(np.int64), bins, n_boot,
                                                   np.random.default_rng(seed))
    return {"n": int(s.size), "counts": summary.counts, "psum": summary.psum, "brier": summary.brier,
            "boot_counts": boot_counts, "boot_brier": boot_brier}


def _bootstrap_cells(cells: Cells, y: np.ndarray, bins: int, n_boot: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap replicates of released cells: resampled cases counted in their cell, with its mean error."""
    n = y.size
    counts = np.zeros((n_boot, 2, bins), dtype=np.int64)
    brier = np.zeros(n_boot, dtype=np.float64)
    for b in range(n_boot):
        take = rng.integers(0, n, n)
        np.add.at(counts[b], (y[take], cells.bin[take]), 1)
        brier[b] = float(cells.err[take].sum())
    return counts, brier


@dataclass(frozen=True)
class SiteAggregates:
    """A site's evaluation reply, parsed and checked."""

    summary: ScoreSummary
    boot: list[ScoreSummary]

    def __add__(self, other: SiteAggregates) -> SiteAggregates:
        if len(self.boot) != len(other.boot):
            raise ProtocolError("(pool)", f"sites sent {len(self.boot)} and {len(other.boot)} bootstrap replicates",
                                "send one study config to all sites")
        return SiteAggregates(self.summary + other.summary, [a + b for a, b in zip(self.boot, other.boot, strict=True)])


def parse_site_evaluation(site_id: str, reply: Mapping[str, object], bins: int) -> SiteAggregates:
    """Check a site's :func:`site_evaluation` reply against the shared binning."""
    try:
        counts = np.asarray(reply["counts"], dtype=np.int64)
        psum = np.asarray(reply["psum"], dtype=np.float64)
        brier = float(reply["brier"])  # type: ignore[arg-type]
        boot_counts = np.asarray(reply["boot_counts"], dtype=np.int64)
        boot_brier = np.asarray(reply["boot_brier"], dtype=np.float64)
    except KeyError as exc:
        raise ProtocolError(site_id, f"evaluation reply lacks {exc}",
                            "run the same fedbiopsy version everywhere") from exc
    if counts.shape != (2, bins) or psum.shape != (2, bins) or boot_counts.ndim != 3 \
            or boot_counts.shape[1:] != (2, bins) or boot_brier.shape != (boot_counts.shape[0],):
        raise ProtocolError(site_id, f"evaluation histograms do not have the study's {bins} score bins",
                            "send one study config to all sites")
    if np.any(counts < 0) or np.any(boot_counts < 0) or not np.all(np.isfinite(psum)) or not math.isfinite(brier):
        raise ProtocolError(site_id, "evaluation aggregates hold negative counts or non-finite sums")
    n = int(counts.sum())
    if np.any(boot_counts.sum(axis=(1, 2)) != n):
        raise ProtocolError(site_id, "bootstrap replicates do not have the site's case count")
    if np.any(psum < -1e-9) or np.any(psum > counts + 1e-9):
        raise ProtocolError(site_id, "score sums are outside [0, count] per bin")
    boot = [ScoreSummary(boot_counts[b], np.zeros_like(psum), float(boot_brier[b])) for b in range(len(boot_brier))]
    return SiteAggregates(ScoreSummary(counts, psum, brier), boot)


def with_ci(agg: SiteAggregates, level: float = 0.95) -> dict[str, float]:
    """Metrics of ``agg`` with percentile bootstrap CIs: ``auc``, ``auc_lo``, ``auc_hi``, ..."""
    out = metrics_of(agg.summary)
    if agg.boot:
        reps = [metrics_of(b) for b in agg.boot]
        a = (1.0 - level) / 2.0
        for m in METRICS:
            vals = np.asarray([r[m] for r in reps], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            lo, hi = (np.quantile(vals, [a, 1.0 - a]) if vals.size else (math.nan, math.nan))
            out[f"{m}_lo"], out[f"{m}_hi"] = float(lo), float(hi)
    return out


def pool(aggs: Iterable[SiteAggregates]) -> SiteAggregates:
    """The sum of sites' aggregates (and of their replicates, replicate by replicate)."""
    items = list(aggs)
    if not items:
        raise ProtocolError("(none)", "no site evaluation to pool")
    total = items[0]
    for a in items[1:]:
        total = total + a
    return total


def finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """The finite entries only (registry metrics and JSON have no NaN)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
