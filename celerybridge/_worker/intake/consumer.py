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

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from celery.utils.collections import AttributeDict
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed, DecodeError

from ..._constants import (
    DEAD_KIND_DELIVERIES,
    DEAD_KIND_MALFORMED,
    DEAD_KIND_REPLAY,
    DEAD_KIND_SIGNATURE,
    DEAD_KIND_UNKNOWN_TASK,
    DEFAULT_MAX_MESSAGE_BYTES,
    DROPPED_HEADER,
    MAX_BYTES_OPTION,
    OVER_LIMIT,
    POPPED_FROM,
    SIGNATURE_HEADER,
    STORE_RETRY_PAUSE,
    UNCOUNTED,
)
from ..._signing import Signer, signer_of
from ..._utils import printable
from ..dead_letter import DeadLettered, consumed_queue, move_to_dead_letters
from . import shape
from .replay import ReplayGuard

log = logging.getLogger("celerybridge.intake")

# A dead letter's headers, as a broker frame, must stay under RabbitMQ's frame size
# (128 KiB by default): values larger than this are named, not kept.
MAX_KEPT_HEADER_BYTES = 16 * 1024


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
        """Why ``message`` must not reach Celery, or ``None``. Raises only
        :class:`StoreUnavailable` (the message is not at fault)."""
        try:
            return self._refusal(message)
        except StoreUnavailable:
            raise
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
        if (reason := _over_limit(message)) is not None:
            return Refusal(DEAD_KIND_DELIVERIES, reason, authentic)
        if self.guard is not None:
            redelivered = bool((message.delivery_info or {}).get("redelivered"))
            try:
                reason = self.guard.refusal(headers[SIGNATURE_HEADER], redelivered, headers["id"])
            except Exception as exc:
                raise StoreUnavailable(
                    f"the replay record cannot be read ({type(exc).__name__}); "
                    f"the message goes back to its queue in {STORE_RETRY_PAUSE:g} s"
                ) from exc
            if reason is not None:
                # The first copy ran or is running: its result is not this copy's to fail.
                return Refusal(DEAD_KIND_REPLAY, reason, False)
        return None


def _over_limit(message: Any) -> str | None:
    """Why ``message`` must not run again: the Redis transport took it more times than
    ``CELERYBRIDGE_MAX_DELIVERIES`` allows (``_redis_transport``), or ``None``."""
    marked = getattr(message.channel, OVER_LIMIT, None)
    if not isinstance(marked, dict) or message.delivery_tag not in marked:
        return None
    count, limit = marked[message.delivery_tag]
    return f"delivered {count} times, more than CELERYBRIDGE_MAX_DELIVERIES ({limit})"


class StoreUnavailable(Exception):
    """The replay record could not be read: the message waits, it is not refused."""


class IntakeConsumer(Consumer):
    """Celery's consumer with the intake gate before its task handler, and every message
    Celery itself cannot take moved to the dead-letter queue instead of dropped."""

    _gate: Gate | None = None
    _passed: Any = None
    """The message the gate let through, while Celery's handler has it."""

    @property
    def gate(self) -> Gate:
        """The gate of this worker's app, built on first use."""
        if self._gate is None:
            signer = signer_of(self.app)
            options = self.app.conf.broker_transport_options or {}
            self._gate = Gate(
                signer,
                None if signer is None else ReplayGuard.for_app(self.app, signer.max_age),
                int(options.get(MAX_BYTES_OPTION, DEFAULT_MAX_MESSAGE_BYTES)),
            )
        return self._gate

    @property
    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        return tuple(self.connection_errors)  # type: ignore[attr-defined]

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        gate = self.gate
        connection_errors = self._connection_errors

        def on_task_received(message: Any) -> None:
            try:
                refusal = gate.refusal(message)
            except StoreUnavailable as exc:
                self._put_back(message, str(exc))
                return
            if refusal is not None:
                self._refuse(message, refusal)
                return
            self._passed = message  # Celery's own refusals below know it passed the gate
            try:
                handle(message)
            except connection_errors:
                raise
            except Exception as exc:
                reason = f"the worker could not take the message: {type(exc).__name__}: {exc}"
                self._refuse(message, Refusal(DEAD_KIND_MALFORMED, reason, True))
            finally:
                self._passed = None

        return on_task_received

    # Celery's own refusals. kombu calls on_decode_error before the task handler (a body
    # it cannot decompress or decode), so the gate is asked first there too: a forged
    # message must not fail someone else's task through that door.

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        reason = f"cannot decode a {message.content_type!r} body: {exc}"
        self._refuse_after_gate(message, DEAD_KIND_MALFORMED, reason)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        reason = f"no task {name!r} on this worker"
        self._refuse_after_gate(message, DEAD_KIND_UNKNOWN_TASK, reason)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        reason = "not a Celery task message (no 'task' header)"
        self._refuse_after_gate(message, DEAD_KIND_MALFORMED, reason)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if isinstance(exc, ContentDisallowed | DecodeError):
            reason = f"cannot decode a {message.content_type!r} body: {exc}"
        else:
            reason = f"invalid task message: {exc}"
        self._refuse_after_gate(message, DEAD_KIND_MALFORMED, reason)

    def _refuse_after_gate(self, message: Any, kind: str, reason: str) -> None:
        if message.acknowledged:  # the gate already refused it
            return
        if message is self._passed:  # asked once: a second time would read as a replay
            self._refuse(message, Refusal(kind, reason, True))
            return
        try:
            refusal = self.gate.refusal(message)
        except StoreUnavailable as exc:
            self._put_back(message, str(exc))
            return
        self._refuse(message, refusal or Refusal(kind, reason, True))

    def _queue_of(self, message: Any) -> str:
        """The queue ``message`` came from: the list a Redis entry was popped from, the
        queue an AMQP consumer tag reads, else its routing key when this worker consumes a
        queue of that name, else the default queue (a Redis envelope names its own routing
        key: a hostile one cannot send its letter to another queue's dead letters)."""
        popped = getattr(message.channel, POPPED_FROM, None)
        if isinstance(popped, str):
            return popped
        info = message.delivery_info or {}
        consumer = getattr(self, "task_consumer", None)
        tags = getattr(consumer, "_active_tags", None) or {}
        for queue, tag in tags.items():
            if tag == info.get("consumer_tag"):
                return str(queue)
        return consumed_queue(self.app, info.get("routing_key"))

    def _put_back(self, message: Any, why: str) -> None:
        """Return ``message`` to its queue after a pause, on the event loop's timer (the
        hub thread goes on consuming meanwhile): it is not at fault, so putting it back
        is not counted as a delivery (:data:`UNCOUNTED`). Without an event loop (a
        green pool) the pause blocks, as Celery's own consumer would."""
        log.error("a message waits: %s", printable(why))
        hub = getattr(self, "hub", None)
        if hub is not None:
            hub.call_later(STORE_RETRY_PAUSE, _requeue_uncounted, message)
            return
        time.sleep(STORE_RETRY_PAUSE)
        _requeue_uncounted(message)

    def _refuse(self, message: Any, refusal: Refusal) -> None:
        """Move ``message`` as it came to its dead-letter queue, acknowledge it, and fail
        its task when the message is authentic and names one. Never raises but for the
        broker connection (Celery reconnects; the message is then delivered again)."""
        headers = _keepable(message.headers)
        body = message.body if message.body is not None else b""
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogatepass")
        if not isinstance(body, bytes):
            body = bytes(body) if isinstance(body, bytearray | memoryview) else b""
        content_type = message.content_type if isinstance(message.content_type, str) else ""
        encoding = message.content_encoding if isinstance(message.content_encoding, str) else ""
        queue = self._queue_of(message)
        try:
            move_to_dead_letters(
                self.app, body, content_type, encoding, headers, queue, refusal.reason, refusal.kind
            )
        except self._connection_errors:
            raise
        except Exception as exc:
            # Headers the broker would not take back (too large, odd types): keep the
            # body, the reason and what can be said of the rest.
            log.exception("dead-lettering with the original headers failed")
            kept = {DROPPED_HEADER: sorted(printable(k)[:64] for k in headers)[:100]}
            try:
                move_to_dead_letters(
                    self.app, body, content_type, encoding, kept, queue,
                    f"{refusal.reason} (original headers not kept: {type(exc).__name__})",
                    refusal.kind,
                )  # fmt: skip
            except self._connection_errors:
                raise
            except Exception as again:
                self._put_back(message, f"cannot dead-letter it: {type(again).__name__}")
                return
        if not message.acknowledged:
            message.ack()
        task_id = headers.get("id")
        if refusal.authentic and isinstance(task_id, str) and shape.identifier(task_id):
            self._mark_failed(message, headers, task_id, refusal.reason)

    def _mark_failed(
        self, message: Any, headers: dict[str, Any], task_id: str, reason: str
    ) -> None:
        properties = message.properties if isinstance(message.properties, dict) else {}
        request = AttributeDict(
            name=headers.get("task") if isinstance(headers.get("task"), str) else None,
            chord=None,
            root_id=headers.get("root_id") if shape.identifier(headers.get("root_id")) else None,
            correlation_id=_text(properties.get("correlation_id")),
            reply_to=_text(properties.get("reply_to")),
            errbacks=None,
        )
        try:
            self.app.backend.mark_as_failure(task_id, DeadLettered(reason), request=request)
        except Exception:  # the letter is kept; the caller times out instead of hearing
            log.exception("could not mark task %s failed", printable(task_id))


def _requeue_uncounted(message: Any) -> None:
    """Put ``message`` back on its queue without counting a delivery; nothing when it
    was settled meanwhile, or its channel is gone (then the broker redelivers it)."""
    if message.acknowledged:
        return
    uncounted = getattr(message.channel, UNCOUNTED, None)
    if isinstance(uncounted, set):
        uncounted.add(message.delivery_tag)
    try:
        message.reject(requeue=True)
    except Exception as exc:
        if isinstance(uncounted, set):
            uncounted.discard(message.delivery_tag)
        log.warning(
            "could not put a waiting message back (%s: %s); the broker delivers it again",
            type(exc).__name__,
            printable(str(exc)),
        )


def _keepable(headers: Any) -> dict[str, Any]:
    """The headers a dead letter can carry back to the broker: values nested too deep
    (py-amqp writes tables recursively, as it reads them) or too large (a dead letter
    adds its own headers to a frame that may already be near the broker's limit) are
    named in :data:`DROPPED_HEADER`, not kept."""
    if not isinstance(headers, dict):
        return {}
    sizes = {k: _size(v) for k, v in headers.items() if not shape.depth_exceeds(v, shape.MAX_DEPTH)}
    kept: dict[str, Any] = {}
    budget = 4 * MAX_KEPT_HEADER_BYTES
    for name in sorted(sizes, key=sizes.__getitem__):  # the smallest first, while they fit
        if sizes[name] > min(budget, MAX_KEPT_HEADER_BYTES):
            break
        budget -= sizes[name]
        kept[name] = headers[name]
    if len(kept) < len(headers):
        dropped = sorted(printable(k)[:64] for k in headers if k not in kept)
        kept[DROPPED_HEADER] = dropped[:100]
    return kept


def _size(value: Any) -> int:
    """Roughly how many bytes ``value`` takes in a header table."""
    if isinstance(value, str | bytes):
        return len(value) + 8
    try:
        return len(json.dumps(value, default=repr)) + 8
    except (ValueError, RecursionError):
        return MAX_KEPT_HEADER_BYTES + 1


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
