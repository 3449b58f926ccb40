"""The classifier protocol: pooled feature scaling, FedAvg rounds and one federated evaluation (Flower-free).

:func:`run_classifier` is the one driver; the Flower phase (:mod:`server.phases.classifier`) calls it with the
Flower query, tests and the harmonisation experiment with :class:`common.protocol.InMemoryQuery` over
in-memory sites (the hospital side provides their step functions). Rounds, by action:

====================  ==================================================  ==========================================
action                a site sends (aggregates only)                      the server computes
====================  ==================================================  ==========================================
classifier_nyul       mean Nyúl landmarks of its training cases            the federated standard scale
(only with ``classifier.standardise: nyul`` and compact features)
classifier_moments    feature names, count, mean, sum of squares and       pooled mean / SD (the scaling every site
                      centred crossproduct of its training features        applies), the step size
train.classifier      new weights after its local steps, case count        FedAvg of the checked updates
(``rounds_of(kind)``  (and, with DP, the epsilon it has spent)             (:func:`.training.fedavg_round`)
times)
evaluate.classifier   score histograms, bootstrap replicates, SHAP sums,   every metric with CIs, fairness, SHAP and
                      Grad-CAM statistics, vendor and field strength       Grad-CAM summaries (:mod:`.evaluation`)
====================  ==================================================  ==========================================

Training and evaluation rounds tolerate a failing site when the query does (the Flower query without a fixed
cohort): what the query lists in ``failures`` is recorded in each round's history.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.classifier.evaluation import summarise_evaluation
from common.classifier.models import build_model, model_weights, rounds_of
from common.classifier.training import fedavg_round, pooled_correlation, scaling, step_size
from common.config import ClassifierConfig
from common.errors import ProtocolError
from common.nyul import aggregate_nyul
from common.pooled_moments import merge_moments
from common.protocol import NUM_EXAMPLES_KEY, Payload, Query, pack_weights, unpack_weights

log = logging.getLogger(__name__)

NYUL, MOMENTS, TRAIN, EVALUATE = "classifier_nyul", "classifier_moments", "train.classifier", "evaluate.classifier"
ACTIONS: tuple[str, ...] = (NYUL, MOMENTS, TRAIN, EVALUATE)
SITE_ATTRIBUTES: tuple[str, ...] = ("vendor", "field_strength")
"""What an evaluation reply may add about the site's scanner, for the fairness report."""


@dataclass(frozen=True)
class FeatureScaling:
    """What the feature models share: column names, the pooled scaling, the step size, the Nyúl scale."""

    names: list[str]
    mean: np.ndarray
    scale: np.ndarray
    lr: float
    nyul_json: str = ""
    sources: dict[str, str] = field(default_factory=dict)  # each site's feature source (table name, compact)
    counts: dict[str, int] = field(default_factory=dict)  # each site's training cases (the moments' n)

    def payload(self) -> Payload:
        """The entries every training and evaluation message of a feature model carries."""
        return {"feature_names": list(self.names), "x_mean": self.mean, "x_scale": self.scale,
                "nyul_json": self.nyul_json, "lr": self.lr}


@dataclass
class ClassifierRun:
    """One model trained by FedAvg and evaluated at the sites."""

    kind: str
    weights: dict[str, np.ndarray]
    summary: dict
    history: list[dict]  # per round: train_loss by site, rejected updates, failures
    epsilon: dict[str, float]  # with DP: each site's epsilon after the last round it answered
    n_train: dict[str, int]  # training cases by site
    n_evaluated: dict[str, int]  # held-out cases by site
    errors: dict[str, str]  # sites whose evaluation failed
    scaling: FeatureScaling | None = None
    trajectory: list[dict[str, np.ndarray]] = field(default_factory=list)  # initial and every round's weights

    @property
    def mean(self) -> np.ndarray | None:
        """The pooled feature mean (None for the image model)."""
        return None if self.scaling is None else self.scaling.mean

    @property
    def scale(self) -> np.ndarray | None:
        """The pooled feature SD (None for the image model)."""
        return None if self.scaling is None else self.scaling.scale

    @property
    def lr(self) -> float | None:
        """The feature models' step size (None for the image model)."""
        return None if self.scaling is None else self.scaling.lr


def uses_nyul(cfg: ClassifierConfig) -> bool:
    """Whether the feature models need the federated Nyúl scale first (compact features after Nyúl)."""
    return cfg.standardise == "nyul" and cfg.features != "table"


def nyul_scale(query: Query, sequences: Sequence[str]) -> str:
    """The ``classifier_nyul`` round: the federated Nyúl standard scale, as the JSON the sites receive."""
    return json.dumps(aggregate_nyul(query(NYUL, {}), list(sequences)))


def feature_scaling(query: Query, cfg: ClassifierConfig, nyul_json: str = "") -> FeatureScaling:
    """The ``classifier_moments`` round: names (equal at every site), pooled scaling and step size."""
    replies = query(MOMENTS, {"nyul_json": nyul_json})
    if not replies:
        raise ProtocolError("(none)", "no site sent its feature moments")
    sources = {s: str(r.pop("feature_source", "")) for s, r in replies.items()}
    names: list[str] = []
    first = ""
    for site, reply in sorted(replies.items()):
        got = [str(n) for n in reply.pop("feature_names")]  # type: ignore[attr-defined]
        if not first:
            names, first = got, site
        elif got != names:
            raise ProtocolError(site, f"its {len(got)} feature columns differ from site {first!r}'s {len(names)}",
                                "extract and harmonise features with the same settings at every site")
    moments = merge_moments(replies)
    mean, scale = scaling(moments)
    lr = step_size(pooled_correlation(replies, moments), cfg.l2, cfg.lr) if cfg.auto_lr else cfg.lr
    counts = {s: int(r["n"]) for s, r in replies.items()}  # type: ignore[call-overload]
    return FeatureScaling(names, mean, scale, float(lr), nyul_json, sources, counts)


def _train(query: Query, kind: str, cfg: ClassifierConfig, base: Payload, weights: dict[str, np.ndarray],
           minimum: int, keep_weights: bool, bounds: Mapping[str, int] | None = None
           ) -> tuple[dict[str, np.ndarray], ClassifierRun]:
    """``rounds_of(kind)`` FedAvg rounds; the run holds the history (its summary is filled in later)."""
    run = ClassifierRun(kind, weights, {}, [], {}, {}, {}, {}, trajectory=[weights] if keep_weights else [])
    rounds = rounds_of(kind, cfg)
    for rnd in range(1, rounds + 1):
        replies = query(TRAIN, {**base, "round": rnd, **pack_weights(weights)})
        updates = {}
        for site, r in replies.items():
            n = float(r[NUM_EXAMPLES_KEY])  # type: ignore[arg-type]
            updates[site] = (unpack_weights(r), n)
            run.n_train[site] = int(n)
            if float(r.get("dp", 0.0)):  # type: ignore[arg-type]
                run.epsilon[site] = float(r["epsilon"])  # type: ignore[arg-type]
        weights, rejected = fedavg_round(weights, updates, cfg.max_update_norm, minimum=minimum,
                                         bounds=None if bounds is None else {s: float(n) for s, n in bounds.items()})
        loss = {s: float(r.get("train-loss", np.nan)) for s, r in replies.items()}  # type: ignore[arg-type]
        run.history.append({"round": rnd, "train_loss": loss, "rejected": rejected,
                            "errors": dict(query.failures)})
        if keep_weights:
            run.trajectory.append(weights)
        if rnd == 1 or rnd % 10 == 0 or rnd == rounds:
            log.info("classifier %s round %d: mean train loss %.4f over %d site(s)", kind, rnd,
                     float(np.nanmean(list(loss.values()))) if loss else float("nan"), len(replies))
    return weights, run


def run_classifier(query: Query, kind: str, cfg: ClassifierConfig, *, features: FeatureScaling | None = None,
                   sequences: Sequence[str] = (), n_channels: int = 2, minimum: int = 1,
                   keep_weights: bool = False, case_counts: Mapping[str, int] | None = None) -> ClassifierRun:
    """Train model ``kind`` by FedAvg over the query's sites and evaluate it there.

    Feature models need the pooled scaling: pass ``features`` (from :func:`feature_scaling`, shared by every
    model of a study), else its rounds run first (with the Nyúl round over ``sequences`` when
    :func:`uses_nyul`). The image model has ``n_channels`` input channels (the study's sequences). A round
    needs at least ``minimum`` acceptable updates. A site's ``num-examples`` may not exceed the training cases
    it reported in the moments round (feature models) or its ``case_counts`` entry (the image model; e.g. the
    fingerprint's case counts); without either, counts are not bounded.
    """
    base: Payload = {"model": kind}
    n_features = 0
    if kind != "image":
        if features is None:
            features = feature_scaling(query, cfg, nyul_scale(query, sequences) if uses_nyul(cfg) else "")
        base.update(features.payload())
        n_features = len(features.names)
    else:
        features = None
    init = model_weights(build_model(kind, n_features, cfg, n_channels=n_channels))
    bounds = features.counts if features is not None and features.counts else case_counts
    weights, run = _train(query, kind, cfg, base, init, minimum, keep_weights, bounds)
    replies = query(EVALUATE, {**base, **pack_weights(weights)})
    attrs = {s: {a: str(r.pop(a)) for a in SITE_ATTRIBUTES if a in r} for s, r in replies.items()}
    run.summary = summarise_evaluation(replies, attrs, bins=cfg.score_bins, calibration_bins=cfg.calibration_bins,
                                       feature_names=features.names if features is not None else None)
    run.weights, run.scaling = weights, features
    run.n_evaluated = {s: int(r["n"]) for s, r in replies.items()}  # type: ignore[call-overload]
    run.errors = dict(query.failures)
    pooled = run.summary["pooled"]
    log.info("classifier %s: pooled AUC %.3f (95%% CI %.3f-%.3f), accuracy %.3f", kind, pooled["auc"],
             pooled.get("auc_lo", np.nan), pooled.get("auc_hi", np.nan), pooled["accuracy"])
    return run


def participants(runs: Mapping[str, ClassifierRun]) -> dict[str, int]:
    """Each site's cases over the models: the most training plus held-out cases any model used."""
    out: dict[str, int] = {}
    for run in runs.values():
        for site, n in run.n_evaluated.items():
            out[site] = max(out.get(site, 0), run.n_train.get(site, 0) + n)
    return out
