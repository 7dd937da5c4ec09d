"""Messages a worker cannot accept go to a dead-letter queue, never silently away.

Celery acknowledges and drops a message it cannot decode (a pickle body on a JSON-only
worker, an unknown content type), and rejects one naming a task it does not have; a
caller awaiting either would wait for nothing. Workers built with
:func:`~celerybridge.celery_app` use :class:`DeadLetterConsumer` instead: the message
is moved, untouched, to ``<queue>.dead`` with the reason in a header, and the task is
marked failed with :class:`DeadLettered`, which callers see as
:class:`~celerybridge.DeadLetteredError`. Implementations (:class:`DeadLetterTask`)
also copy there the calls that fail the contract on receipt or exhaust their retries.
A worker with a signing key sends there, the same way, every message whose signature
is missing, wrong or out of its time window (``_signing.py``), before Celery reads it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import Task
from celery.utils.collections import AttributeDict
from celery.worker.consumer import Consumer
from kombu import Queue
from kombu.exceptions import ContentDisallowed, DecodeError

from ._constants import CONTENT_TYPE, DEAD_FROM_HEADER, DEAD_LETTER_SUFFIX, DEAD_REASON_HEADER
from ._exceptions import ArgumentError
from ._signing import signer_of

log = logging.getLogger("celerybridge.dead_letter")


class DeadLettered(Exception):
    """Stored as a task's failure when its message was moved to the dead-letter queue."""


def _undecodable(message: Any, exc: Exception) -> str:
    return f"cannot decode a {message.content_type!r} body: {exc}"


def dead_letter_queue(queue: str) -> str:
    """Where messages refused on ``queue`` go: ``<queue>.dead``."""
    return f"{queue}{DEAD_LETTER_SUFFIX}"


class DeadLetterConsumer(Consumer):
    """Celery's consumer, moving what it cannot accept to the dead-letter queue."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        signer = signer_of(self.app)
        if signer is None:
            return handle

        def on_task_received(message: Any) -> None:
            # Before Celery reads anything: no strategy, no decoding, no "Received" log.
            reason = signer.refusal(message.headers, message.body)
            if reason is not None:
                self._dead_letter(message, reason)
                message.ack()
                return
            handle(message)

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._dead_letter(message, _undecodable(message, exc))
        message.ack()

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        self._dead_letter(message, f"no task {name!r} on this worker")
        message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "not a Celery task message (no 'task' header)")
        message.ack()

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        # Protocol 2 decodes the body only here, so a refused content type lands here too.
        if isinstance(exc, ContentDisallowed | DecodeError):
            reason = _undecodable(message, exc)
        else:
            reason = f"invalid task message: {exc}"
        self._dead_letter(message, reason)
        message.ack()

    def _dead_letter(self, message: Any, reason: str) -> None:
        """Move ``message`` as it is to its dead-letter queue, then fail its task."""
        headers = dict(message.headers or {})
        queue = (message.delivery_info or {}).get("routing_key") or "celery"
        move_to_dead_letters(
            self.app,
            message.body,
            message.content_type,
            message.content_encoding,
            headers,
            queue,
            reason,
        )
        task_id = headers.get("id")
        if task_id:
            request = AttributeDict(
                name=headers.get("task"),
                chord=None,
                root_id=headers.get("root_id"),
                correlation_id=message.properties.get("correlation_id"),
                reply_to=message.properties.get("reply_to"),
                errbacks=None,
            )
            self.app.backend.mark_as_failure(task_id, DeadLettered(reason), request=request)


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
        queue = (request.delivery_info or {}).get("routing_key") or "celery"
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
        if retried_out:
            reason = f"failed after {request.retries} retries: {reason}"
        move_to_dead_letters(self.app, body.encode(), CONTENT_TYPE, "utf-8", headers, queue, reason)


def move_to_dead_letters(
    app: Any,
    body: bytes,
    content_type: str,
    content_encoding: str,
    headers: dict[str, Any],
    queue: str,
    reason: str,
) -> None:
    """Publish a message, as it is, to ``queue``'s dead-letter queue with the reason."""
    target = dead_letter_queue(queue)
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange="",
            routing_key=target,
            declare=[Queue(target, durable=True)],
            headers={**headers, DEAD_REASON_HEADER: reason, DEAD_FROM_HEADER: queue},
            content_type=content_type,
            content_encoding=content_encoding,
            retry=True,
        )
    log.error("task %s moved to %s: %s", headers.get("id"), target, reason)
