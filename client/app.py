"""The hospital's Flower ClientApp: one thin adapter from messages to the site steps of :mod:`client.steps`.

The site directory comes from the SuperNode's ``--node-config 'data-path="/data/site"'``. Every message,
whatever its protocol, goes through :func:`handle`: decode, hold the request to the site's policy
(:mod:`client.guard`), run the step, check and encode the aggregate reply. A refusal or a failure is answered
with a fixed text naming the rule and the fix, never a value, id, path or exception text; the detail goes to
the site's own logs under ``derived/``. This is the only client module that imports Flower.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client.guard import check_reply, check_request, check_study, public_reason, record_error, record_refusal
from client.maps import ensure_site_maps
from client.sitecache import load_site_cached
from client.steps import SITE_STEPS, SiteStep
from common.config import StudyConfig
from common.errors import ConfigError, FedBiopsyError, PolicyError
from common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ERROR_DATA,
    ERROR_INTERNAL,
    ERROR_POLICY,
    SITE_ID_KEY,
    STUDY_KEY,
    Payload,
    from_records,
    message_type,
    to_records,
    wire_array,
)
from common.sitedata import Site

log = logging.getLogger("fedbiopsy.client")
DATA_PATH_KEY = "data-path"


def encode(payload: Payload) -> RecordDict:
    """A payload as a message's content: one ArrayRecord (the packed arrays), one ConfigRecord."""
    arrays, config = to_records(payload)
    return RecordDict({ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       CONFIG_KEY: ConfigRecord(config)})  # type: ignore[arg-type]


def decode(content: RecordDict) -> Payload:
    """A message's content as a payload (:func:`common.protocol.from_records`)."""
    arrays = content.array_records.get(ARRAYS_KEY)
    config = content.config_records.get(CONFIG_KEY)
    return from_records({k: wire_array(a.stype, a.data, a.numpy) for k, a in (arrays or {}).items()},
                        dict(config or {}))


def site_dir_from_context(context: Context) -> Path:
    """The site directory this node serves."""
    value = context.node_config.get(DATA_PATH_KEY)
    if not value:
        raise ConfigError("--node-config", f"the SuperNode has no {DATA_PATH_KEY!r}",
                          f"start it with --node-config '{DATA_PATH_KEY}=\"/path/to/site\"'")
    return Path(str(value))


IMAGING_PHASES = frozenset({"fingerprint", "preprocessing", "segmentation", "features", "classifier"})


def handle(step: SiteStep, msg: Message, context: Context) -> Message:
    """Run one site step for one message through the site's guard; errors become error replies.

    Before the step: the policy's request rules (:func:`client.guard.check_request`) and the study's fields
    the phase uses (:func:`client.guard.check_study`). After it: :func:`client.guard.check_reply`. A refusal or
    failure answers a fixed text (:func:`client.guard.public_reason`); its detail goes to the site's own log.
    """
    study: StudyConfig | None = None
    site: Site | None = None
    kind = msg.metadata.message_type
    who = None
    try:
        payload = decode(msg.content)
        study = StudyConfig.model_validate(json.loads(str(payload.pop(STUDY_KEY))))
        site = load_site_cached(site_dir_from_context(context))
        who = site.site_id
        check_request(site.config, step.phase, study.hash, step.n_cases(site))
        check_study(site, step.phase, study)
        if study.four_d and not site.tabular and step.phase in IMAGING_PHASES:
            site = ensure_site_maps(site, study)  # the 4D series' maps join each case's channels (cached)
        reply = step.run(site, study, payload)
        check_reply(site, reply)
        reply[SITE_ID_KEY] = site.site_id
        return Message(encode(reply), reply_to=msg)
    except PolicyError as err:
        log.warning("refused %s: rule %s (detail in the site's refusal log)", kind, err.rule)
        if site is not None:
            record_refusal(site.root, err, kind, context.run_id, study.hash if study is not None else None)
        return Message(Error(code=ERROR_POLICY, reason=public_reason(err, who)), reply_to=msg)
    except Exception as err:  # noqa: BLE001 - a site must answer, never hang the round
        code = ERROR_DATA if isinstance(err, FedBiopsyError) else ERROR_INTERNAL
        log.exception("site step %s failed", kind)
        if site is not None:
            record_error(site.root, err, kind, context.run_id)
        return Message(Error(code=code, reason=public_reason(err, who)), reply_to=msg)


def build_client_app(mods: list | None = None) -> ClientApp:
    """A ClientApp answering every action of :data:`client.steps.SITE_STEPS` through :func:`handle`."""
    client_app = ClientApp(mods=mods or [])
    for action, step in SITE_STEPS.items():
        def handler(msg: Message, context: Context, _step: SiteStep = step) -> Message:
            return handle(_step, msg, context)

        category, _, name = message_type(action).partition(".")
        register = {"query": client_app.query, "train": client_app.train, "evaluate": client_app.evaluate}[category]
        register(name)(handler)
    return client_app


app = build_client_app()
