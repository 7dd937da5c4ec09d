"""What the Celery ecosystem hooks into around a publish, done on the fast path too.

Celery's ``send_task`` sends ``before_task_publish`` once the message is built and
``after_task_publish`` once the broker took it; OpenTelemetry's Celery instrumentation
and others add their headers in the first. Sentry does not use the signals: its Celery
integration wraps ``Celery.send_task`` and ``Task.apply_async`` to open a submit span and
add ``sentry-trace`` and ``baggage`` headers. The kombu path goes through ``send_task``
and gets all of that from Celery; the native publishers get it here, with the same
arguments, so a receiver cannot tell the paths apart.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from celery import signals
from kombu import Exchange, Queue

from .._constants import AMQP_EXCHANGE_TYPE, PUBLISH_RETRY_POLICY


def before_publish(
    queue: str,
    task_name: str,
    payload: tuple[Any, Any, Any],
    headers: dict[str, Any],
    properties: dict[str, Any],
    declare: Callable[[str], Queue] | None = None,
) -> None:
    """Send ``before_task_publish`` as ``send_task`` does for a task sent to ``queue``.

    Receivers may change ``headers``, ``properties`` and the arguments in ``payload``
    in place: the caller builds the message from them afterwards. ``declare`` gives the
    queue as the publisher would declare it (default: as Celery declares a queue it
    does not know, ``Queues.new_missing``); it is called only when there are receivers.
    """
    signal = signals.before_task_publish
    if not signal.receivers:
        return
    signal.send(
        sender=task_name,
        body=payload,
        exchange="",  # Celery: the default exchange, routing key = queue
        routing_key=queue,
        declare=[(declare or celery_queue)(queue)],
        headers=headers,
        properties=properties,
        retry_policy=dict(PUBLISH_RETRY_POLICY),
    )


@lru_cache(maxsize=1024)
def celery_queue(queue: str) -> Queue:
    """What Celery would declare for ``queue`` (``Queues.new_missing``), built once."""
    return Queue(queue, Exchange(queue, AMQP_EXCHANGE_TYPE), routing_key=queue)


def after_publish(
    queue: str, task_name: str, payload: tuple[Any, Any, Any], headers: dict[str, Any]
) -> None:
    """Send ``after_task_publish`` as ``send_task`` does, once the broker took the message,
    then the deprecated ``task_sent`` if anything listens to it, as Celery still does."""
    signal = signals.after_task_publish
    if signal.receivers:
        signal.send(sender=task_name, body=payload, headers=headers, exchange="", routing_key=queue)
    if signals.task_sent.receivers:
        signals.task_sent.send(
            sender=task_name,
            task_id=headers["id"],
            task=task_name,
            args=payload[0],
            kwargs=payload[1],
            eta=headers["eta"],
            taskset=headers["group"],
        )


def sentry_headers(task_name: str, headers: Mapping[str, Any]) -> Mapping[str, Any]:
    """``headers`` with Sentry's trace headers added, as its Celery integration adds them
    to a ``send_task`` call; ``headers`` unchanged when that integration is not loaded.

    The integration's own wrapper does the work (a submit span, ``sentry-trace``,
    ``baggage``, both at the top and under ``headers`` as Celery's worker needs them,
    and its ``sentry-propagate-traces`` opt-out), around a call that only takes the
    headers it passes on. Never imports ``sentry_sdk``: an application that uses it has
    imported it.
    """
    integration = sys.modules.get("sentry_sdk.integrations.celery")
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]] | None = getattr(
        integration, "_wrap_task_run", None
    )
    if wrap is None:
        return headers
    sent: dict[str, Any] = {}

    def send_task(_app: object, _name: str, *, headers: Mapping[str, Any] | None) -> None:
        sent.update(headers or {})

    # Called as Celery.send_task(app, name, headers=...): the wrapper reads the name there.
    wrap(send_task)(None, task_name, headers=dict(headers))
    return sent
