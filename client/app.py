"""The hospital's Flower ClientApp: one thin adapter from messages to the site steps of :mod:`client.steps`.

The site directory comes from the SuperNode's ``--node-config 'data-path="/data/site"'``. Every message,
whatever its protocol, goes through :func:`handle`: decode, check the site's policy once, run the step,
encode the aggregate reply. A refusal or a failure is answered with one kind of error reply naming the rule
or the problem, and a refusal is logged locally. This is the only client module that imports Flower.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client.apphash import running_app_hash
from client.policy import check_request, record_refusal
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
    from_wire,
    message_type,
    to_wire,
)
from common.sitedata import Site

log = logging.getLogger("fedbiopsy.client")
DATA_PATH_KEY = "data-path"


def encode(payload: Payload) -> RecordDict:
    """A reply payload as a message's content (one ArrayRecord, one ConfigRecord)."""
    arrays, config = to_wire(payload)
    return RecordDict({ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       CONFIG_KEY: ConfigRecord(config)})  # type: ignore[arg-type]


def decode(content: RecordDict) -> Payload:
    """A request message's content as a payload."""
    arrays = content.array_records.get(ARRAYS_KEY)
    config = content.config_records.get(CONFIG_KEY)
    return from_wire({k: a.numpy() for k, a in (arrays or {}).items()}, dict(config or {}))


def site_dir_from_context(context: Context) -> Path:
    """The site directory this node serves."""
    value = context.node_config.get(DATA_PATH_KEY)
    if not value:
        raise ConfigError("--node-config", f"the SuperNode has no {DATA_PATH_KEY!r}",
                          f"start it with --node-config '{DATA_PATH_KEY}=\"/path/to/site\"'")
    return Path(str(value))


def handle(step: SiteStep, msg: Message, context: Context) -> Message:
    """Run one site step for one message, with the policy check first; errors become error replies."""
    study: StudyConfig | None = None
    site: Site | None = None
    try:
        payload = decode(msg.content)
        study = StudyConfig.model_validate(json.loads(str(payload.pop(STUDY_KEY))))
        site = load_site_cached(site_dir_from_context(context))
        app_hash = running_app_hash() if site.config.policy.approved_apps else None
        check_request(site.config, step.phase, study.hash, step.n_cases(site), app_hash=app_hash)
        reply = step.run(site, study, payload)
        reply[SITE_ID_KEY] = site.site_id
        return Message(encode(reply), reply_to=msg)
    except FedBiopsyError as err:
        code = ERROR_POLICY if isinstance(err, PolicyError) else ERROR_DATA
        log.warning("refused %s: %s", msg.metadata.message_type, err)
        if isinstance(err, PolicyError) and site is not None:
            record_refusal(site.root, err, msg.metadata.message_type, context.run_id,
                           study.hash if study is not None else None)
        return Message(Error(code=code, reason=str(err)), reply_to=msg)
    except Exception as err:  # noqa: BLE001 - a site must answer, never hang the round
        log.exception("site step %s failed", msg.metadata.message_type)
        return Message(Error(code=ERROR_INTERNAL, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


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
