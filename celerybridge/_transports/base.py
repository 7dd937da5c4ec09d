"""The per-broker interfaces: publishing a message and awaiting a result."""

from __future__ import annotations

import contextvars
from abc import ABC, abstractmethod
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from .._constants import (
    POLL_FACTOR,
    POLL_INITIAL,
    POLL_MAX,
    PUBLISH_BUILDERS,
    PUBLISH_WINDOW_BYTES,
    PUBLISH_WINDOW_MESSAGES,
    READY_STATES,
    SERVICE_HEADER,
)
from .._exceptions import DelegationError
from .._options import check_expires_ahead
from .._utils import uuid4_str
from ._errors import UNBUILDABLE, unbuildable
from ._hooks import after_publish, celery_queue, sentry_headers
from ._protocol import Origin, TaskMessage, check_body_depth, encoded_body, task_message
from ._window import Window, current_ticket

F = TypeVar("F")

if TYPE_CHECKING:
    from kombu import Queue

    from .._options import SendOptions
    from .._signing import Signer
    from .._validation import BoundCall


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One validated call, ready to be published as a Celery task message."""

    task_id: str
    task_name: str
    """The wire name the worker looks the task up by."""
    queue: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    """``Celery.send_task`` keywords: ``countdown``, ``eta``, ``expires``, ``priority``,
    ``headers``, ``time_limit``, ``soft_time_limit``, ``retry``, ``retry_policy``,
    ``link``, ``link_error``, and for a workflow's steps ``chain``, ``chord``,
    ``group_id``, ``group_index``, ``root_id``, ``parent_id``."""

    def from_service(self, service: str | None) -> OutgoingMessage:
        """This message, naming the sending ``service`` in its headers (if any)."""
        if service is None:
            return self
        headers = {**self.options.get("headers", {}), SERVICE_HEADER: service}
        return replace(self, options={**self.options, "headers": headers})

    @classmethod
    def new(
        cls, task_name: str, call: BoundCall, options: SendOptions, task_id: str | None = None
    ) -> OutgoingMessage:
        """Build the message for ``call`` with a fresh task id unless one is given.

        Callbacks (``link``, ``link_error``) nest deeper in the body than arguments, which
        were checked on their own: the body is checked too (:func:`check_body_depth`).
        """
        if isinstance(options.expires, datetime):  # given earlier, it may have passed
            check_expires_ahead(options.expires)
        message = cls(
            task_id=task_id or options.task_id or uuid4_str(),
            task_name=task_name,
            queue=options.queue,
            args=call.args,
            kwargs=dict(call.kwargs),
            options=options.celery_options(),
        )
        if options.link or options.link_error:
            check_body_depth(task_name, encoded_body(message))
        return message


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """The final state of a task as the result backend stored it, decoded from JSON."""

    state: str
    """``SUCCESS``, ``FAILURE`` or ``REVOKED``."""
    result: Any
    """The return value, or Celery's exception record (``exc_type``, ``exc_message``...)."""
    traceback: str | None = None


def outcome_from_meta(meta: Any) -> TaskOutcome | None:
    """The outcome in a decoded result record, or ``None`` if the task has not ended.

    The record stays data: an exception class it names is never imported
    (CVE-2021-23727), which is why ``AsyncResult.get()`` is never used.
    """
    status = meta.get("status") if isinstance(meta, dict) else None
    if not isinstance(status, str) or status not in READY_STATES:
        return None
    return TaskOutcome(meta["status"], meta.get("result"), meta.get("traceback"))


class Publisher(ABC):
    """Puts task messages on a broker."""

    def admit(self) -> AbstractAsyncContextManager[object]:
        """Room for one more publish, held while it is validated, encoded and sent.

        The bridge builds a message only once admitted. The default admits at once.
        """
        return nullcontext()

    @abstractmethod
    async def publish(self, message: OutgoingMessage) -> None:
        """Return once the broker has accepted ``message`` (publisher confirms on AMQP)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections. Idempotent."""


class NativePublisher(Publisher, Generic[F]):
    """A publisher on the event loop (the fast path).

    Builds each message as ``send_task`` would, with what the ecosystem adds to it
    there (``_hooks``: Sentry's trace headers, ``before_task_publish``), signs it with
    ``signer`` if any, has the subclass frame it (``F``: what its broker is sent) and
    send it, then sends ``after_task_publish``. The hooks run in a copy of the caller's
    context: what they make current (OpenTelemetry keeps its publish span current until
    ``after_task_publish``, which a failed publish never sends) stays with the publish.
    A message that cannot be built or framed (a receiver put something there JSON or
    AMQP cannot carry) is a :class:`DelegationError`, and nothing is sent.

    Refuses once closed. Admission (``_window``): at most ``PUBLISH_BUILDERS`` publishes
    are validated and encoded per iteration of the loop, so a thousand delegations
    started at once do not all do that work in one iteration; once built, a publish
    waits for the broker with up to :attr:`window_messages` others (``PUBLISH_WINDOW_BYTES``
    in all), so round trips to a distant broker overlap; and at most ``PUBLISH_BUILDERS``
    callers resume per iteration once the broker accepted their message.
    """

    window_messages = PUBLISH_WINDOW_MESSAGES
    """Publishes admitted at once (built, or waiting for the broker)."""
    _paces_itself = False
    """Whether ``_send`` returns at a paced turn already (``Window.settle``)."""

    def __init__(self, *, signer: Signer | None = None, reply_to: str | None = None) -> None:
        self._closed = False
        self._window = Window(
            turns=PUBLISH_BUILDERS, messages=self.window_messages, size=PUBLISH_WINDOW_BYTES
        )
        self._signer = signer
        self._origin = Origin(reply_to)  # reply_to: the bridge's rpc:// reply queue, if any

    def admit(self) -> AbstractAsyncContextManager[object]:
        return self._window.ticket()

    async def publish(self, message: OutgoingMessage) -> None:
        if self._closed:
            raise DelegationError("the publisher is closed")
        context = contextvars.copy_context()
        try:
            wire, framed = context.run(self._build, message)
        except UNBUILDABLE as exc:
            raise unbuildable(message.task_name, exc) from exc
        ticket = current_ticket()
        if ticket is not None:
            ticket.built(self._size(framed))
        await self._send(message, framed)
        if ticket is not None and not self._paces_itself:
            await self._window.finish()
        context.run(after_publish, message.queue, message.task_name, wire.payload, wire.headers)

    def _build(self, message: OutgoingMessage) -> tuple[TaskMessage, F]:
        headers = message.options.get("headers") or {}
        traced = sentry_headers(message.task_name, headers)
        if traced is not headers:
            message = replace(message, options={**message.options, "headers": traced})
        wire = task_message(message, self._origin, signer=self._signer, declare=self._queue)
        return wire, self._frame(message, wire)

    def _queue(self, name: str) -> Queue:
        """The queue ``name`` as this publisher declares it, as publish signals show it."""
        return celery_queue(name)

    @abstractmethod
    def _frame(self, message: OutgoingMessage, wire: TaskMessage) -> F:
        """``wire`` as this broker is sent it; raises what ``UNBUILDABLE`` lists if it
        cannot carry it."""

    @abstractmethod
    def _size(self, framed: F) -> int:
        """The bytes ``framed`` puts on the wire, about (for the window)."""

    @abstractmethod
    async def _send(self, message: OutgoingMessage, framed: F) -> None:
        """Send ``framed``, built for ``message``; return once the broker accepted it."""


class ResultSource(ABC):
    """Reads task outcomes from a result backend."""

    @abstractmethod
    async def wait(self, task_id: str) -> TaskOutcome:
        """Wait, without limit, for the task to reach a final state.

        Callers bound the wait with a timeout; cancellation must leave no state behind.
        """

    @abstractmethod
    async def poll(self, task_id: str) -> TaskOutcome | None:
        """The task's final outcome if it has one now, else ``None``; never waits for it."""

    async def prepare(self) -> None:
        """Get ready for the results of tasks about to be sent; the bridge calls it before
        each publish when the backend needs it (``rpc://``: the reply queue must exist
        before a worker replies to it). The default does nothing."""
        return None

    def expect(self, task_id: str) -> None:
        """``task_id`` is about to be sent: a result source that keeps only the results
        it expects (``rpc://``) keeps its result. The default does nothing."""
        return None

    @property
    @abstractmethod
    def waiting(self) -> int:
        """How many ``wait`` calls are in progress (zero once all are done or cancelled)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections. Idempotent."""


class PolledResultSource(ResultSource):
    """A result source that reads in threads: ``wait`` polls :meth:`poll` with growing
    pauses (``POLL_INITIAL``, times ``POLL_FACTOR``, at most ``POLL_MAX`` seconds)."""

    _waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    async def wait(self, task_id: str) -> TaskOutcome:
        self._waiting += 1
        try:
            pause = POLL_INITIAL
            while True:
                outcome = await self.poll(task_id)
                if outcome is not None:
                    return outcome
                await anyio.sleep(pause)
                pause = min(pause * POLL_FACTOR, POLL_MAX)
        finally:
            self._waiting -= 1
