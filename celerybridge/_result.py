"""Awaitable handles on delegated tasks, and turning stored outcomes into values."""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast, overload

import anyio
from celery import result as celery_result
from celery.result import AsyncResult
from pydantic import ValidationError

from ._constants import POLL_FACTOR, POLL_INITIAL, STATE_SUCCESS
from ._exceptions import (
    DeadLetteredError,
    RemoteTaskError,
    ResultBackendError,
    ResultError,
    ResultTimeoutError,
)
from ._transports._errors import translate
from ._transports.base import outcome_from_meta
from ._utils import Timeout, to_seconds

if TYPE_CHECKING:
    from celery import Celery

    from ._bridge import Bridge
    from ._contracts import RemoteTask
    from ._transports.base import TaskOutcome

R = TypeVar("R")


class TaskHandle(Generic[R]):
    """A task the broker has accepted.

    ``await handle`` (or ``await handle.result(timeout=...)``) returns the remote
    return value, coerced to the contract's return annotation, or raises
    :class:`RemoteTaskError` or :class:`ResultTimeoutError`. Nothing waits for the
    result until you ask for it: a handle you drop costs nothing.
    """

    __slots__ = ("_bridge", "_stub", "id")

    def __init__(self, bridge: Bridge, stub: RemoteTask[Any, R], task_id: str) -> None:
        self._bridge = bridge
        self._stub = stub
        self.id = task_id
        """The Celery task id."""

    @property
    def task_name(self) -> str:
        """The wire name the task was sent under."""
        return self._stub.wire_name

    @property
    def version(self) -> int:
        """The contract version that was called."""
        return self._stub.version

    async def result(self, timeout: Timeout | None = None) -> R:
        """Wait for the task to finish; ``timeout`` in seconds or as a ``timedelta``.

        Without ``timeout`` the bridge's ``result_timeout`` applies.
        """
        outcome = await self._bridge.wait_for(self._stub, self.id, timeout)
        return decode_outcome(self._stub, self.id, outcome)

    async def done(self) -> bool:
        """Whether the task has finished (succeeded, failed or was revoked), without waiting.

        One read of the result backend. A task id the backend never heard of (or whose
        result expired) looks unfinished.
        """
        return await self._bridge.poll(self.id) is not None

    def __await__(self) -> Generator[Any, None, R]:
        return self.result().__await__()

    def __repr__(self) -> str:
        return f"<TaskHandle {self._stub.wire_name!r} id={self.id}>"


class GroupHandle:
    """A group the broker has accepted: one handle per member, in order.

    ``await handle`` (or ``await handle.result(timeout=...)``) returns the members'
    results as a list, each decoded through its own contract; the first failure raises.
    """

    __slots__ = ("handles", "id")

    def __init__(self, group_id: str, handles: Sequence[TaskHandle[Any] | GroupHandle]) -> None:
        self.id = group_id
        """The Celery group id."""
        self.handles = tuple(handles)
        """The members' handles (a nested group's is a :class:`GroupHandle`)."""

    async def result(self, timeout: Timeout | None = None) -> list[Any]:
        """Wait for every member; ``timeout`` bounds the whole wait."""
        seconds = to_seconds(timeout)
        values: list[Any] = []
        deadline = None if seconds is None else anyio.current_time() + seconds
        for handle in self.handles:
            left = None if deadline is None else max(deadline - anyio.current_time(), 1e-3)
            values.append(await handle.result(timeout=left))
        return values

    def __await__(self) -> Generator[Any, None, list[Any]]:
        return self.result().__await__()

    def __len__(self) -> int:
        return len(self.handles)

    def __repr__(self) -> str:
        return f"<GroupHandle id={self.id} members={len(self.handles)}>"


class ContractResult(AsyncResult[R]):
    """What a stub's sync ``apply_async`` and ``delay`` return: Celery's ``AsyncResult``
    (``id``, ``state``, ``ready()``... work as usual) whose ``get()`` decodes the result
    through the contract's return type and raises the async path's errors.

    ``get(timeout=...)`` raises :class:`RemoteTaskError` for a failed task (with
    ``propagate=False`` it returns it), :class:`ResultTimeoutError` when the timeout
    passes. The stored failure is read as data: its exception class is never imported
    or instantiated, and ``.result`` of a failed task is the stored record (a dict).
    """

    def __init__(
        self, task_id: str, stub: RemoteTask[Any, R], *, backend: Any, app: Celery
    ) -> None:
        super().__init__(task_id, backend=backend, app=app, task_name=stub.wire_name)
        self.stub = stub
        """The contract the result is decoded through."""

    @overload  # type: ignore[override]
    def get(
        self,
        timeout: Timeout | None = None,
        propagate: Literal[True] = True,
        interval: float = 0.5,
        no_ack: bool = True,
        follow_parents: bool = True,
        callback: Any = None,
        on_message: Any = None,
        on_interval: Any = None,
        disable_sync_subtasks: bool = True,
        **_states: Any,
    ) -> R: ...
    @overload
    def get(
        self,
        timeout: Timeout | None,
        propagate: bool,
        interval: float = 0.5,
        no_ack: bool = True,
        follow_parents: bool = True,
        callback: Any = None,
        on_message: Any = None,
        on_interval: Any = None,
        disable_sync_subtasks: bool = True,
        **_states: Any,
    ) -> R | RemoteTaskError: ...
    @overload
    def get(
        self,
        timeout: Timeout | None = None,
        *,
        propagate: bool,
        interval: float = 0.5,
        no_ack: bool = True,
        follow_parents: bool = True,
        callback: Any = None,
        on_message: Any = None,
        on_interval: Any = None,
        disable_sync_subtasks: bool = True,
        **_states: Any,
    ) -> R | RemoteTaskError: ...
    def get(
        self,
        timeout: Timeout | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        no_ack: bool = True,
        follow_parents: bool = True,
        callback: Any = None,
        on_message: Any = None,
        on_interval: Any = None,
        disable_sync_subtasks: bool = True,
        **_states: Any,
    ) -> R | RemoteTaskError:
        """Block until the task finished: its value, decoded through the contract.

        ``timeout`` in seconds or a ``timedelta`` (``None``: no limit, as in Celery);
        the backend is read with growing pauses up to ``interval`` seconds. Inside a
        task it refuses to block, as Celery does (``disable_sync_subtasks``). With
        ``propagate=False`` a failure is returned, not raised: typed ``R | RemoteTaskError``.
        A record that is not a JSON object raises :class:`ResultBackendError`.
        """
        if disable_sync_subtasks:
            celery_result.assert_will_not_block()  # type: ignore[attr-defined]
        seconds = to_seconds(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        pause = POLL_INITIAL
        while (outcome := self._outcome()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                stub = self.stub
                raise ResultTimeoutError(stub.name, stub.version, self.id, cast(float, seconds))
            left = None if deadline is None else deadline - time.monotonic()
            time.sleep(max(0.0, min(pause, left if left is not None else pause)))
            pause = min(pause * POLL_FACTOR, max(interval, POLL_INITIAL))
        try:
            return decode_outcome(self.stub, self.id, outcome)
        except RemoteTaskError as exc:
            if propagate:
                raise
            return exc

    wait = get  # type: ignore[assignment]  # Celery's alias

    def _outcome(self) -> TaskOutcome | None:
        with translate(ResultBackendError, f"reading the result of task {self.id}"):
            meta = self.backend.get_task_meta(self.id, cache=False)
        if not isinstance(meta, dict):  # Celery's own reads would raise AttributeError
            raise ResultBackendError(
                f"the result backend holds a record for task {self.id} that is not a JSON "
                f"object but {_json_kind(meta)}: not a task's result"
            )
        return outcome_from_meta(meta)

    def __repr__(self) -> str:
        return f"<ContractResult {self.stub.wire_name!r} id={self.id}>"


# How a dead letter's failure is stored (celerybridge._worker.dead_letter.DeadLettered), by name:
# the module is never imported from what a backend says.
DEAD_LETTERED = ("celerybridge._worker.dead_letter", "DeadLettered")


def decode_outcome(stub: RemoteTask[Any, R], task_id: str, outcome: TaskOutcome) -> R:
    """The value of a successful outcome, else the remote failure as a :class:`RemoteTaskError`."""
    if outcome.state == STATE_SUCCESS:
        try:
            value: R = stub.binder.load_result(outcome.result)
        except ValidationError as exc:
            raise ResultError(
                f"task {stub.name!r} v{stub.version} ({task_id}) returned a value that does not "
                f"match its contract: {exc.errors(include_url=False)[0]['msg']}"
            ) from None
        return value
    record = outcome.result if isinstance(outcome.result, dict) else {}
    dead = (record.get("exc_module"), record.get("exc_type")) == DEAD_LETTERED
    raise (DeadLetteredError if dead else RemoteTaskError)(
        task=stub.name,
        version=stub.version,
        task_id=task_id,
        remote_type=str(record.get("exc_type", outcome.state)),
        remote_message=_message_of(record.get("exc_message", outcome.result)),
        # A record is data from the backend: only strings are kept where strings belong.
        remote_traceback=outcome.traceback if isinstance(outcome.traceback, str) else None,
        remote_module=_string_or_none(record.get("exc_module")),
    )


def _string_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def _message_of(exc_message: Any) -> str:
    # Celery stores an exception's args: usually a one-element list holding the message.
    if isinstance(exc_message, list | tuple):
        return ", ".join(str(part) for part in exc_message)
    return "" if exc_message is None else str(exc_message)
