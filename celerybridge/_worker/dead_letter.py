"""Messages a worker cannot accept go to a dead-letter queue, never silently away.

Celery acknowledges and drops a message it cannot decode (a pickle body on a JSON-only
worker, an unknown content type), and rejects one naming a task it does not have; a
caller awaiting either would wait for nothing. Workers built with
:func:`~celerybridge.celery_app` refuse such messages at their intake gate
(``_intake/``): the message is moved, untouched, to ``<queue>.dead`` with the reason and
its kind in headers, and the task is marked failed with :class:`DeadLettered`, which
callers see as :class:`~celerybridge.DeadLetteredError`. Implementations
(:class:`DeadLetterTask`) also copy there the calls that fail the contract on receipt or
exhaust their retries.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from amqp.exceptions import PreconditionFailed
from celery import Task
from kombu import Queue

from .._constants import (
    CONTENT_TYPE,
    DEAD_FROM_HEADER,
    DEAD_KIND_CONTRACT,
    DEAD_KIND_HEADER,
    DEAD_KIND_RETRIES,
    DEAD_LETTER_SUFFIX,
    DEAD_REASON_HEADER,
    DEFAULT_QUEUE,
)
from .._exceptions import ArgumentError
from .._utils import printable

log = logging.getLogger("celerybridge.dead_letter")


class DeadLettered(Exception):
    """Stored as a task's failure when its message was moved to the dead-letter queue."""


def dead_letter_queue(queue: str) -> str:
    """Where messages refused on ``queue`` go: ``<queue>.dead``."""
    return f"{queue}{DEAD_LETTER_SUFFIX}"


class DeadLetterTask(Task):  # type: ignore[type-arg]
    """The base of every ``@stub.implement`` task: a call whose arguments fail the contract
    on receipt, or that fails after its automatic retries (``autoretry_for``), is also
    copied to the dead-letter queue, with its arguments as received, to be replayed once
    fixed. Its failure stays stored as it is (``ArgumentError``, the upload error...)."""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        retried_out = isinstance(exc, tuple(getattr(self, "autoretry_for", ()) or ()))
        if not (isinstance(exc, ArgumentError) or retried_out):
            return
        request = self.request
        queue = consumed_queue(self.app, (request.delivery_info or {}).get("routing_key"))
        headers = {
            "lang": "py",
            "task": self.name,
            "id": task_id,
            "root_id": request.root_id or task_id,
            "parent_id": request.parent_id,
            "retries": request.retries,
        }
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        body = json.dumps([list(args or ()), dict(kwargs or {}), embed])
        reason = f"{type(exc).__name__}: {exc}"
        kind = DEAD_KIND_CONTRACT
        if retried_out:
            reason = f"failed after {request.retries} retries: {reason}"
            kind = DEAD_KIND_RETRIES
        move_to_dead_letters(
            self.app, body.encode(), CONTENT_TYPE, "utf-8", headers, queue, reason, kind
        )


def consumed_queue(app: Any, routing_key: Any) -> str:
    """``routing_key`` when ``app``'s worker consumes a queue of that name, else its
    default queue: a message cannot send its dead letter to another service's queue."""
    consumed = {q.name for q in app.amqp.queues.consume_from.values()}
    if isinstance(routing_key, str) and routing_key in consumed:
        return routing_key
    return str(app.conf.task_default_queue or DEFAULT_QUEUE)


def move_to_dead_letters(
    app: Any,
    body: bytes,
    content_type: str,
    content_encoding: str,
    headers: dict[str, Any],
    queue: str,
    reason: str,
    kind: str,
) -> None:
    """Publish a message, as it is, to ``queue``'s dead-letter queue with the reason
    and its kind (``DEAD_KIND_*``)."""
    target = dead_letter_queue(queue)
    message = {
        "exchange": "",
        "routing_key": target,
        "headers": {
            **headers,
            DEAD_REASON_HEADER: reason,
            DEAD_FROM_HEADER: queue,
            DEAD_KIND_HEADER: kind,
        },
        "content_type": content_type,
        "content_encoding": content_encoding,
        "retry": True,
    }
    try:
        with app.producer_or_acquire() as producer:
            producer.publish(body, declare=[Queue(target, durable=True)], **message)
    except PreconditionFailed:
        # The dead-letter queue exists, declared with other arguments (an operator's
        # policy, a quorum queue): publish to it as it is, on a channel of its own (a
        # refused declaration closed the other one).
        with app.connection_for_write() as connection:
            connection.Producer().publish(body, **message)
    log.error("task %s moved to %s: %s", printable(headers.get("id")), target, printable(reason))
