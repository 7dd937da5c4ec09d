"""The gate in front of Celery: every message a worker takes passes here first.

:class:`IntakeConsumer` is Celery's consumer (``worker_consumer``) with its task handler
wrapped by :class:`Gate`: before Celery's strategy, request or tracer code reads
anything, a message must be a well-formed protocol 2 JSON task message (``shape.py``),
carry a good signature when the worker has a key (``_signing.py``), and not be a replay
of a signed message already taken (``replay.py``). What fails is moved, as it came, to
``<queue>.dead`` with its reason and kind, acknowledged, and its task marked failed so a
waiting caller hears at once. Nothing that arrives can make the consumer raise: an error
Celery's own code still raises on a message that passed the gate dead-letters it too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery.utils.collections import AttributeDict
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed, DecodeError

from .._constants import (
    DEAD_KIND_MALFORMED,
    DEAD_KIND_REPLAY,
    DEAD_KIND_SIGNATURE,
    DEAD_KIND_UNKNOWN_TASK,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_QUEUE,
    SIGNATURE_HEADER,
)
from .._dead_letter import DeadLettered, move_to_dead_letters
from .._signing import Signer, signer_of
from . import shape
from .redis import MAX_BYTES_OPTION
from .replay import ReplayGuard, guard_for

log = logging.getLogger("celerybridge.intake")

DROPPED_HEADER = "x-celerybridge-dropped-headers"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message does not run, and whether its task id may be marked failed."""

    kind: str
    reason: str
    authentic: bool
    """``True`` when the message may come from a caller: no key is required, or its
    signature is good. A forged message must not fail someone else's task."""


class Gate:
    """The checks of one worker, in the order that reads least of a hostile message."""

    def __init__(self, signer: Signer | None, guard: ReplayGuard | None, max_bytes: int) -> None:
        self.signer = signer
        self.guard = guard
        self.max_bytes = max_bytes

    def refusal(self, message: Any) -> Refusal | None:
        """Why ``message`` must not reach Celery, or ``None``. Never raises."""
        try:
            return self._refusal(message)
        except Exception as exc:  # a check that raised is a refusal, not a crash
            log.exception("the intake gate failed on a message")
            return Refusal(DEAD_KIND_MALFORMED, f"unreadable message ({type(exc).__name__})", False)

    def _refusal(self, message: Any) -> Refusal | None:
        headers = message.headers
        if (reason := shape.readable_refusal(headers)) is not None:
            return Refusal(DEAD_KIND_MALFORMED, reason, False)
        authentic = self.signer is None
        reason = shape.content_refusal(message.content_type, message.content_encoding, headers)
        if reason is None and len(message.body or b"") > self.max_bytes:
            reason = (
                f"the body has {len(message.body)} bytes, more than the {self.max_bytes} "
                "this worker accepts (CELERYBRIDGE_MAX_MESSAGE_BYTES)"
            )
        if reason is not None:
            return Refusal(DEAD_KIND_MALFORMED, reason, authentic)
        if self.signer is not None:
            reason = self.signer.refusal(
                headers,
                message.body or b"",
                content_type=message.content_type,
                content_encoding=message.content_encoding,
            )
            if reason is not None:
                return Refusal(DEAD_KIND_SIGNATURE, reason, False)
            authentic = True
        reason = shape.header_refusal(headers) or shape.property_refusal(message.properties)
        if reason is None:
            document, reason = shape.parse_body(message.body or b"", self.max_bytes)
            if reason is None:
                reason = shape.body_refusal(document)
        if reason is not None:
            return Refusal(DEAD_KIND_MALFORMED, reason, authentic)
        if self.guard is not None:
            redelivered = bool((message.delivery_info or {}).get("redelivered"))
            reason = self.guard.refusal(headers[SIGNATURE_HEADER], redelivered)
            if reason is not None:
                # The first copy ran or is running: its result is not this copy's to fail.
                return Refusal(DEAD_KIND_REPLAY, reason, False)
        return None


class IntakeConsumer(Consumer):
    """Celery's consumer with the intake gate before its task handler, and every message
    Celery itself cannot take moved to the dead-letter queue instead of dropped."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        signer = signer_of(self.app)
        options = self.app.conf.broker_transport_options or {}
        gate = Gate(
            signer,
            None if signer is None else guard_for(self.app, signer.max_age),
            int(options.get(MAX_BYTES_OPTION, DEFAULT_MAX_MESSAGE_BYTES)),
        )
        connection_errors: tuple[type[BaseException], ...] = tuple(
            self.connection_errors  # type: ignore[attr-defined]
        )

        def on_task_received(message: Any) -> None:
            refusal = gate.refusal(message)
            if refusal is not None:
                self._refuse(message, refusal)
                return
            try:
                handle(message)
            except connection_errors:
                raise
            except Exception as exc:
                reason = f"the worker could not take the message: {type(exc).__name__}: {exc}"
                self._refuse(message, Refusal(DEAD_KIND_MALFORMED, reason, True))

        return on_task_received

    # Celery's own refusals (reached only by messages the gate let through).

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        reason = f"cannot decode a {message.content_type!r} body: {exc}"
        self._refuse(message, Refusal(DEAD_KIND_MALFORMED, reason, True))

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        reason = f"no task {name!r} on this worker"
        self._refuse(message, Refusal(DEAD_KIND_UNKNOWN_TASK, reason, True))

    def on_unknown_message(self, body: Any, message: Any) -> None:
        reason = "not a Celery task message (no 'task' header)"
        self._refuse(message, Refusal(DEAD_KIND_MALFORMED, reason, True))

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if isinstance(exc, ContentDisallowed | DecodeError):
            reason = f"cannot decode a {message.content_type!r} body: {exc}"
        else:
            reason = f"invalid task message: {exc}"
        self._refuse(message, Refusal(DEAD_KIND_MALFORMED, reason, True))

    def _queue_of(self, message: Any) -> str:
        """The queue ``message`` came from: its routing key when this worker consumes a
        queue of that name (a Redis envelope names its own), else the default queue."""
        routing_key = (message.delivery_info or {}).get("routing_key")
        consumed = {q.name for q in self.app.amqp.queues.consume_from.values()}
        if isinstance(routing_key, str) and routing_key in consumed:
            return routing_key
        return self.app.conf.task_default_queue or DEFAULT_QUEUE

    def _refuse(self, message: Any, refusal: Refusal) -> None:
        """Move ``message`` as it came to its dead-letter queue, acknowledge it, and fail
        its task when the message is authentic and names one."""
        headers = _keepable(message.headers)
        body = message.body if message.body is not None else b""
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogateescape")
        move_to_dead_letters(
            self.app,
            body,
            message.content_type if isinstance(message.content_type, str) else "",
            message.content_encoding if isinstance(message.content_encoding, str) else "",
            dict(headers),
            self._queue_of(message),
            refusal.reason,
            refusal.kind,
        )
        if not message.acknowledged:
            message.ack()
        task_id = headers.get("id")
        if refusal.authentic and isinstance(task_id, str) and shape._identifier(task_id):
            self._mark_failed(message, headers, task_id, refusal.reason)

    def _mark_failed(
        self, message: Any, headers: dict[str, Any], task_id: str, reason: str
    ) -> None:
        properties = message.properties if isinstance(message.properties, dict) else {}
        request = AttributeDict(
            name=headers.get("task") if isinstance(headers.get("task"), str) else None,
            chord=None,
            root_id=headers.get("root_id") if shape._identifier(headers.get("root_id")) else None,
            correlation_id=_text(properties.get("correlation_id")),
            reply_to=_text(properties.get("reply_to")),
            errbacks=None,
        )
        try:
            self.app.backend.mark_as_failure(task_id, DeadLettered(reason), request=request)
        except Exception:  # the letter is kept; the caller times out instead of hearing
            log.exception("could not mark task %s failed", ascii(task_id))


def _keepable(headers: Any) -> dict[str, Any]:
    """The headers a dead letter can carry: those nested too deep to be written back
    (py-amqp encodes recursively, as it decodes) are named, not kept."""
    if not isinstance(headers, dict):
        return {}
    kept = {k: v for k, v in headers.items() if not shape._depth_exceeds(v, shape.MAX_DEPTH)}
    if len(kept) < len(headers):
        kept[DROPPED_HEADER] = sorted(str(k)[:64] for k in headers if k not in kept)
    return kept


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
