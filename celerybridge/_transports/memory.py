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

from .._constants import CONTENT_TYPE, DEFAULT_QUEUE, SERIALIZER, STATE_FAILURE, STATE_SUCCESS
from .._exceptions import CallError
from .._registry import registry
from .._utils import as_list, uuid4_str
from .base import OutgoingMessage, Publisher, ResultSource, TaskOutcome

_ACCEPT = {CONTENT_TYPE}  # kombu's loads() takes content types, not serializer names


class MemoryTransport(Publisher, ResultSource):
    """A test double for services that delegate: ``Bridge(publisher=t, results=t)``.

    Every published message is kept in :attr:`messages` after a JSON round trip
    through kombu's serializer, exactly as it would cross a broker. With ``execute``
    (the default) a message whose task has an implementation registered in this
    process (``@stub.implement``) runs at once, validated as a worker would, and its
    outcome is stored; otherwise set outcomes with :meth:`set_result`.

    A workflow (``Bridge.send_canvas``) goes on as on a worker: the next step of a chain
    and ``link`` callbacks are published with the result (first, unless immutable),
    ``link_error`` callbacks with the failed task's id (Celery's old-style errback).
    A chord, or a group inside a chain, is not run here: executing one raises
    :class:`~celerybridge.CallError`.
    """

    def __init__(self, *, execute: bool = True) -> None:
        self.execute = execute
        self.messages: list[OutgoingMessage] = []
        self._outcomes: dict[str, TaskOutcome] = {}
        self._events: dict[str, anyio.Event] = {}
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """How many :meth:`wait` calls are waiting for an outcome now (a test can wait
        for a caller to be waiting before it sets the result)."""
        return self._waiting

    async def publish(self, message: OutgoingMessage) -> None:
        """Keep ``message`` in :attr:`messages` after a JSON round trip and, with
        ``execute``, run its task's implementation if this process has one (then a
        workflow's next step and callbacks, as a worker would)."""
        content_type, encoding, body = dumps([message.args, message.kwargs], SERIALIZER)
        args, kwargs = loads(body, content_type, encoding, accept=_ACCEPT)
        message = replace(message, args=tuple(args), kwargs=kwargs)
        self.messages.append(message)
        fn = registry.implementations.get(message.task_name)
        stub = registry.by_wire_name(message.task_name)
        if not (self.execute and fn is not None and stub is not None):
            return
        _runnable(message)
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
            for errback in as_list(message.options.get("link_error")):
                await self._follow(errback, (message.task_id,))
            return
        result = self._outcomes[message.task_id].result
        chain = list(message.options.get("chain") or ())
        if chain:  # Celery's protocol: the next step is the last one
            await self._follow(chain.pop(), (result,), chain)
        for callback in as_list(message.options.get("link")):
            await self._follow(callback, (result,))

    async def _follow(
        self, sig: Mapping[str, Any], given: tuple[Any, ...], chain: list[Any] | None = None
    ) -> None:
        """Publish what a worker would after a task: ``sig`` with ``given`` first."""
        options = dict(sig.get("options") or {})
        task_id = options.pop("task_id", None) or uuid4_str()
        queue = options.pop("queue", None) or DEFAULT_QUEUE
        for key in ("reply_to", "group_id", "group_index", "root_id", "parent_id"):
            options.pop(key, None)
        args = tuple(sig.get("args") or ())
        if not sig.get("immutable"):
            args = (*given, *args)
        if chain:
            options["chain"] = chain
        follow = OutgoingMessage(
            task_id=task_id,
            task_name=str(sig.get("task")),
            queue=queue,
            args=args,
            kwargs=dict(sig.get("kwargs") or {}),
            options=options,
        )
        await self.publish(follow)

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
        """The outcome stored for ``task_id``, or ``None``; never waits."""
        return self._outcomes.get(task_id)

    async def wait(self, task_id: str) -> TaskOutcome:
        """Wait, without limit, for an outcome for ``task_id`` (the bridge bounds it)."""
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
        """Nothing to release but the events of waits in progress; the kept messages and
        outcomes stay readable."""
        self._events.clear()


def _runnable(message: OutgoingMessage) -> None:
    """Refuse to run what this double cannot carry on as a worker would."""
    steps = [*as_list(message.options.get("chain")), *as_list(message.options.get("link"))]
    nested = [s for s in steps if isinstance(s, Mapping) and s.get("subtask_type")]
    if message.options.get("chord") is not None or nested:
        raise CallError(
            f"MemoryTransport cannot run task {message.task_name!r} of this workflow: it "
            "runs chains of single tasks and link callbacks, not chords or groups inside "
            "a workflow; use MemoryTransport(execute=False) and set_result()"
        )
