"""The hospital's Flower ClientApp: a thin adapter from messages to the site steps.

The site directory comes from the SuperNode's ``--node-config 'data-path="/data/site"'``. Every request
is checked against the site's policy (``site.yaml``) before any computation; a refusal is answered with
an error reply naming the rule, and logged locally.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from client.apphash import running_app_hash
from client.policy import check_request, record_refusal
from client.records import decode, encode
from client.sitecache import load_site_cached
from client.steps import SITE_STEPS, SiteStep
from common.config import StudyConfig
from common.errors import ConfigError, FedBiopsyError, PolicyError
from common.sitedata import Site

log = logging.getLogger("fedbiopsy.client")
DATA_PATH_KEY = "data-path"
STUDY_KEY = "study-config-json"
ERROR_POLICY = 403
ERROR_DATA = 422
ERROR_INTERNAL = 500


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
        reply["site_id"] = site.site_id
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
    """A ClientApp answering every query action of :data:`client.steps.SITE_STEPS`."""
    client_app = ClientApp(mods=mods or [])
    for action, step in SITE_STEPS.items():
        def handler(msg: Message, context: Context, _step: SiteStep = step) -> Message:
            return handle(_step, msg, context)

        client_app.query(action)(handler)
    from client.segmentation_handlers import evaluate_handler, train_handler  # noqa: PLC0415 (imports this module)

    client_app.train()(train_handler)
    client_app.evaluate()(evaluate_handler)
    from client.classifier_handlers import register_classifier  # noqa: PLC0415 (imports this module)

    register_classifier(client_app)
    return client_app


app = build_client_app()
