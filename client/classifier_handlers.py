"""Flower ``train.classifier`` / ``evaluate.classifier`` handlers: the classifier phase's own message actions.

Flower routes ``train.<action>`` to ``@app.train("<action>")``, so the classifier's rounds never reach the
segmentation's default ``train`` / ``evaluate`` handlers. Both go through :func:`client.app.handle` (policy
check first, errors as error replies) with the site steps of :mod:`client.steps.classifier`.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

ACTION = "classifier"


def register_classifier(client_app: ClientApp) -> None:
    """Add the classifier's train and evaluate handlers to ``client_app``."""
    from client.app import handle  # noqa: PLC0415 (client.app imports this module)
    from client.steps.classifier import EVALUATE_STEP, TRAIN_STEP

    def train(msg: Message, context: Context) -> Message:
        return handle(TRAIN_STEP, msg, context)

    def evaluate(msg: Message, context: Context) -> Message:
        return handle(EVALUATE_STEP, msg, context)

    client_app.train(ACTION)(train)
    client_app.evaluate(ACTION)(evaluate)
