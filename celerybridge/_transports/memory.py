"""An in-process broker and result backend with the real path's serialisation."""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import anyio
import anyio.to_thread
from kombu.serialization import dumps, loads

from .._constants import CONTENT_TYPE, SERIALIZER, STATE_FAILURE, STATE_SUCCESS
from .._registry import registry
from .base import OutgoingMessage, Publisher, ResultSource, TaskOutcome

_ACCEPT = {CONTENT_TYPE}  # kombu's loads() takes content types, not serializer names


class MemoryTransport(Publisher, ResultSource):
    """A test double for services that delegate: ``Bridge(publisher=t, results=t)``.

    Every published message is kept in :attr:`messages` after a JSON round trip
    through kombu's serializer, exactly as it would cross a broker. With ``execute``
    (the default) a message whose task has an implementation registered in this
    process (``@stub.implement``) runs at once, validated as a worker would, and its
    outcome is stored; otherwise set outcomes with :meth:`set_result`.
    """

    def __init__(self, *, execute: bool = True) -> None:
        self.execute = execute
        self.messages: list[OutgoingMessage] = []
        self._outcomes: dict[str, TaskOutcome] = {}
        self._events: dict[str, anyio.Event] = {}
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    async def publish(self, message: OutgoingMessage) -> None:
        content_type, encoding, body = dumps([message.args, message.kwargs], SERIALIZER)
        args, kwargs = loads(body, content_type, encoding, accept=_ACCEPT)
        message = replace(message, args=tuple(args), kwargs=kwargs)
        self.messages.append(message)
        fn = registry.implementations.get(message.task_name)
        stub = registry.by_wire_name(message.task_name)
        if self.execute and fn is not None and stub is not None:
            try:
                call = stub.binder.receive(args, kwargs)
                call_args, call_kwargs = stub.binder.call_arguments(call)
                if inspect.iscoroutinefunction(fn):
                    value = await fn(*call_args, **call_kwargs)
                else:
                    value = await anyio.to_thread.run_sync(lambda: fn(*call_args, **call_kwargs))
                self.set_result(message.task_id, stub.binder.dump_result(value))
            except Exception as exc:
                self.set_failure(message.task_id, exc)

    def set_result(self, task_id: str, value: Any) -> None:
        """Store a successful outcome for ``task_id`` (as JSON, like a real backend)."""
        content_type, encoding, body = dumps(value, SERIALIZER)
        value = loads(body, content_type, encoding, accept=_ACCEPT)
        self._store(task_id, TaskOutcome(STATE_SUCCESS, value))

    def set_failure(self, task_id: str, exc: BaseException) -> None:
        """Store a failure for ``task_id`` in the record Celery's JSON backend writes."""
        record: Mapping[str, Any] = {
            "exc_type": type(exc).__name__,
            "exc_module": type(exc).__module__,
            "exc_message": [str(arg) for arg in exc.args],
        }
        text = "".join(traceback.format_exception(exc))
        self._store(task_id, TaskOutcome(STATE_FAILURE, dict(record), text))

    def _store(self, task_id: str, outcome: TaskOutcome) -> None:
        self._outcomes[task_id] = outcome
        event = self._events.pop(task_id, None)
        if event is not None:
            event.set()

    async def poll(self, task_id: str) -> TaskOutcome | None:
        return self._outcomes.get(task_id)

    async def wait(self, task_id: str) -> TaskOutcome:
        self._waiting += 1
        try:
            while task_id not in self._outcomes:
                event = self._events.setdefault(task_id, anyio.Event())
                await event.wait()
            return self._outcomes[task_id]
        finally:
            self._waiting -= 1
            if task_id not in self._outcomes:
                self._events.pop(task_id, None)

    async def aclose(self) -> None:
        self._events.clear()
