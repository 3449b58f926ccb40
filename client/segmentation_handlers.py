"""Flower ``train`` / ``evaluate`` handlers of the segmentation phase: messages in, Flower-free calls, replies out.

A train message carries the global weights (ArrayRecord ``"arrays"``) and a ConfigRecord ``"config"`` with the
study and plan as JSON (plus Flower's ``server-round`` and, for FedProx, ``proximal-mu``). The reply holds exactly
one ArrayRecord (the new weights) and one MetricRecord (with ``num-examples``), as Flower's strategies expect.
The DP accountant's history is kept in the node's ``Context.state`` between rounds.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from client.apphash import running_app_hash
from client.policy import check_request, record_refusal
from common.config import StudyConfig
from common.errors import FedBiopsyError, PolicyError
from common.validation import load_site

log = logging.getLogger("fedbiopsy.client")
PLAN_KEY = "segmentation-plan-json"
DP_STATE_KEY = "fedbiopsy-segmentation-dp"
PHASE = "segmentation"


def _inputs(msg: Message, context: Context, seen: dict) -> tuple:
    from client.app import STUDY_KEY, site_dir_from_context  # noqa: PLC0415 (client.app imports this module)

    config = msg.content.config_records["config"]
    study = StudyConfig.model_validate(json.loads(str(config[STUDY_KEY])))
    seen["study"] = study
    plan = json.loads(str(config[PLAN_KEY]))
    site = load_site(site_dir_from_context(context))
    seen["site"] = site
    app_hash = running_app_hash() if site.config.policy.approved_apps else None
    check_request(site.config, PHASE, study.hash, sum(c.mask is not None for c in site.cases), app_hash=app_hash)
    weights = {k: a.numpy() for k, a in msg.content.array_records["arrays"].items()}
    return config, study, plan, site, weights


def _error_reply(msg: Message, context: Context, err: Exception, seen: dict) -> Message:
    from client.app import ERROR_DATA, ERROR_INTERNAL, ERROR_POLICY  # noqa: PLC0415

    if isinstance(err, FedBiopsyError):
        code = ERROR_POLICY if isinstance(err, PolicyError) else ERROR_DATA
        log.warning("refused %s: %s", msg.metadata.message_type, err)
        if isinstance(err, PolicyError) and seen.get("site") is not None:
            study = seen.get("study")
            record_refusal(seen["site"].root, err, msg.metadata.message_type, context.run_id,
                           study.hash if study is not None else None)
        return Message(Error(code=code, reason=str(err)), reply_to=msg)
    log.exception("segmentation %s failed", msg.metadata.message_type)
    return Message(Error(code=ERROR_INTERNAL, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


def train_handler(msg: Message, context: Context) -> Message:
    """One local training round."""
    from client.training.task import train_round

    seen: dict = {}
    try:
        config, study, plan, site, weights = _inputs(msg, context, seen)
        dp_state = None
        if DP_STATE_KEY in context.state.config_records:
            dp_state = json.loads(str(context.state.config_records[DP_STATE_KEY]["json"]))
        out = train_round(site, study, plan, weights, int(config.get("server-round", 0)),
                          proximal_mu=float(config.get("proximal-mu", 0.0)), dp_state=dp_state)
        if out.dp_state is not None:
            context.state.config_records[DP_STATE_KEY] = ConfigRecord({"json": json.dumps(out.dp_state)})
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.weights.items()})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(out.metrics)})  # type: ignore[arg-type]
        return Message(content, reply_to=msg)
    except Exception as err:  # noqa: BLE001 - a site must answer, never hang the round
        return _error_reply(msg, context, err, seen)


def evaluate_handler(msg: Message, context: Context) -> Message:
    """The site's held-out metric summary of the global weights."""
    from client.training.task import evaluate_round

    seen: dict = {}
    try:
        config, study, plan, site, weights = _inputs(msg, context, seen)
        summary = evaluate_round(site, study, plan, weights, int(config.get("server-round", 0)))
        return Message(RecordDict({"metrics": MetricRecord(summary)}), reply_to=msg)  # type: ignore[arg-type]
    except Exception as err:  # noqa: BLE001
        return _error_reply(msg, context, err, seen)
