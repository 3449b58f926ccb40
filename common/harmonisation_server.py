"""The server steps of federated ComBat: the design, the pooled fit and the EB estimates from the sites' replies.

Every reply is checked (keys, shapes, finite values, the same patients per batch in every round) before it is
summed; a bad one raises :class:`ProtocolError` naming the site. The rounds and their order are
:func:`common.harmonisation.run_harmonisation`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from common.combat_design import grand_mean, pooled_variance, solve_design
from common.combat_eb import BatchEstimates, estimate_batches
from common.combat_spec import CombatOptions, CombatSpec
from common.errors import ProtocolError
from common.pooled_moments import GroupMoments, merge_group_moments

CONSTANT_RTOL = 1e-10  # a batch's feature counts as constant when its sd <= CONSTANT_RTOL * |mean|


def _reply_array(site: str, reply: Mapping[str, object], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in reply:
        raise ProtocolError(site, f"ComBat reply lacks {key!r}", "run the same fedbiopsy version at every site")
    value = np.asarray(reply[key], dtype=np.float64)
    if value.shape != shape:
        raise ProtocolError(site, f"ComBat reply {key!r} has shape {value.shape}, expected {shape}",
                            "run the same fedbiopsy version and study config at every site")
    if not np.all(np.isfinite(value)):
        raise ProtocolError(site, f"ComBat reply {key!r} is not finite", "check the site's feature table")
    return value


def _check_counts(replies: Mapping[str, Mapping[str, object]], spec: CombatSpec) -> dict[str, np.ndarray]:
    counts = {s: _reply_array(s, r, "batch_n", (spec.n_batch,)) for s, r in replies.items()}
    if not np.array_equal(sum(counts.values()), np.asarray(spec.batch_counts, dtype=np.float64)):
        raise ProtocolError(", ".join(sorted(counts)), "patients per batch changed between ComBat rounds",
                            "keep the feature tables fixed while the harmonisation phase runs")
    return counts


def _group_moments(replies: Mapping[str, Mapping[str, object]], spec: CombatSpec, mean_key: str, m2_key: str
                   ) -> GroupMoments:
    """The per-batch moments merged over the sites' replies (sites in sorted order)."""
    nb, p = spec.n_batch, spec.n_features
    return merge_group_moments(
        GroupMoments(np.asarray(_reply_array(s, r, "batch_n", (nb,)), dtype=np.int64),
                     _reply_array(s, r, mean_key, (nb, p)), _reply_array(s, r, m2_key, (nb, p)))
        for s, r in sorted(replies.items()))


def _names(reply: Mapping[str, object], site: str) -> list[str]:
    value = reply.get("features")
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(site, "ComBat summary lacks the feature names", "run the same fedbiopsy version everywhere")
    return [str(f) for f in value]


def server_spec(replies: Mapping[str, Mapping[str, object]], options: CombatOptions) -> CombatSpec:
    """Round 0: check the sites agree on features, and fix batches and levels; raises naming the site."""
    if not replies:
        raise ProtocolError("(none)", "no site answered the ComBat summary query")
    sites = sorted(replies)
    first = sites[0]
    features = _names(replies[first], first)
    for site in sites[1:]:
        theirs = _names(replies[site], site)
        if set(theirs) != set(features) or len(theirs) != len(features):
            missing = [f for f in features if f not in set(theirs)]
            extra = [f for f in theirs if f not in set(features)]
            raise ProtocolError(site, f"its feature columns differ from site {first!r}'s: missing {missing[:10]}, "
                                f"extra {extra[:10]}", "extract the same features with the same settings everywhere")
    counts: dict[str, int] = {}
    holders: dict[str, list[str]] = {}
    levels: dict[str, set[str]] = {c: set() for c in options.categorical}
    for site in sites:
        for batch, n in json.loads(str(replies[site]["batches"])).items():
            counts[batch] = counts.get(batch, 0) + int(n)
            holders.setdefault(batch, []).append(site)
        for col, lv in json.loads(str(replies[site]["levels"])).items():
            levels[col].update(lv)
    for batch, n in sorted(counts.items()):
        if n < 2:
            raise ProtocolError(", ".join(holders[batch]), f"batch {batch!r} has {n} patient; ComBat needs at least 2 "
                                "per batch to estimate its scale", "merge it with a similar batch or leave it out")
    if options.ref_batch is not None and options.ref_batch not in counts:
        raise ProtocolError("(study)", f"ref_batch {options.ref_batch!r} is not a batch of any site "
                            f"(batches: {sorted(counts)})", "name an existing batch in harmonisation.ref_batch")
    return CombatSpec.build(options, features, counts, {c: sorted(v) for c, v in levels.items()}, holders)


def check_fit_reply(site: str, wtw: np.ndarray, batch_n: np.ndarray, raw_m2: np.ndarray, nb: int,
                    ref_index: int | None = None) -> None:
    """A site's round-1 sums must be sums over patients: ``W'W`` symmetric positive semi-definite, its batch
    one-hot diagonal (and block) the site's batch counts, and centred sums of squares non-negative. A
    poisoned reply (an update crafted to steer the pooled fit) breaks one of these; it is refused."""
    scale = max(float(np.abs(wtw).max()), 1.0)
    problems = []
    if not np.allclose(wtw, wtw.T, rtol=0, atol=1e-9 * scale):
        problems.append("W'W is not symmetric")
    elif float(np.linalg.eigvalsh(wtw).min()) < -1e-8 * scale:
        problems.append("W'W is not positive semi-definite")
    expected = np.diag(np.asarray(batch_n, dtype=np.float64))
    if ref_index is not None:  # the reference batch's column is all ones (neuroCombat's intercept)
        expected[ref_index, :] = expected[:, ref_index] = batch_n
        expected[ref_index, ref_index] = float(np.sum(batch_n))
    if not np.allclose(wtw[:nb, :nb], expected, rtol=0, atol=1e-9 * scale):
        problems.append("W'W's batch block does not match the site's batch counts")
    if np.any(raw_m2 < -1e-9 * max(float(np.abs(raw_m2).max()), 1.0)):
        problems.append("a centred sum of squares is negative")
    if problems:
        raise ProtocolError(site, f"ComBat fit reply is not a sum over patients ({problems[0]})",
                            "check the site's fedbiopsy version and its feature table")


def server_fit(replies: Mapping[str, Mapping[str, object]], spec: CombatSpec) -> tuple[np.ndarray, np.ndarray]:
    """Round 1: the pooled OLS fit (beta) and grand mean; raises on a feature constant within a batch or a
    site reply that is not a sum over patients (:func:`check_fit_reply`)."""
    q, p = len(spec.design_columns), spec.n_features
    counts = _check_counts(replies, spec)
    for site, reply in sorted(replies.items()):
        check_fit_reply(site, _reply_array(site, reply, "wtw", (q, q)), counts[site],
                        _reply_array(site, reply, "raw_m2", (spec.n_batch, p)), spec.n_batch, spec.ref_index)
    wtw = sum(_reply_array(s, r, "wtw", (q, q)) for s, r in sorted(replies.items()))
    wty = sum(_reply_array(s, r, "wty", (q, p)) for s, r in sorted(replies.items()))
    raw = _group_moments(replies, spec, "raw_mean", "raw_m2")
    n = np.maximum(raw.n, 1)[:, None]
    constant = raw.m2 <= n * np.square(CONSTANT_RTOL * raw.mean)
    for b in np.flatnonzero(constant.any(axis=1)):
        names = [f for f, c in zip(spec.features, constant[b], strict=True) if c]
        raise ProtocolError(spec.sites_of(int(b)), f"feature(s) {names[:10]} are constant within batch "
                            f"{spec.batches[b]!r}", "drop them before harmonising (ComBat cannot scale a constant)")
    beta = solve_design(wtw, wty, spec)  # type: ignore[arg-type]
    return beta, grand_mean(beta, spec)


def server_var(replies: Mapping[str, Mapping[str, object]], spec: CombatSpec) -> np.ndarray:
    """Round 2: the pooled residual variance of each feature."""
    _check_counts(replies, spec)
    rss = sum(_reply_array(s, r, "rss", (spec.n_batch, spec.n_features)) for s, r in sorted(replies.items()))
    return pooled_variance(np.asarray(rss), spec)


def server_eb(replies: Mapping[str, Mapping[str, object]], spec: CombatSpec) -> BatchEstimates:
    """Round 3: EB estimates of every batch from merged moments of the standardised data."""
    _check_counts(replies, spec)
    return estimate_batches(_group_moments(replies, spec, "s_mean", "s_m2"), spec.options, spec.ref_index)


def server_collect(replies: Mapping[str, Mapping[str, object]], spec: CombatSpec) -> BatchEstimates:
    """Final round without round 3: each batch's estimates, from the site that holds it."""
    nb, p = spec.n_batch, spec.n_features
    counts = _check_counts(replies, spec)
    out = BatchEstimates.empty(nb, p)
    for site, reply in sorted(replies.items()):
        rows = [int(b) for b in np.flatnonzero(counts[site])]
        arrays = {}
        for key in BatchEstimates.FIELDS:
            shape = (nb, p) if getattr(out, key).ndim == 2 else (nb,)
            if key in ("a_prior", "b_prior") and spec.options.mean_only:  # NaN by definition
                arrays[key] = np.asarray(reply.get(key, np.full(shape, np.nan)), dtype=np.float64)
            else:
                arrays[key] = _reply_array(site, reply, key, shape)
        out = out.take_rows(rows, BatchEstimates(**arrays))
    return out
