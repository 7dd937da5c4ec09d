"""Awaitable handles on delegated tasks, and turning stored outcomes into values."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import ValidationError

from ._constants import STATE_SUCCESS
from ._exceptions import DeadLetteredError, RemoteTaskError, ResultError
from ._utils import Timeout

if TYPE_CHECKING:
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


# How a dead letter's failure is stored (celerybridge._dead_letter.DeadLettered), by name:
# the module is never imported from what a backend says.
DEAD_LETTERED = ("celerybridge._dead_letter", "DeadLettered")


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
        remote_traceback=outcome.traceback,
        remote_module=record.get("exc_module"),
    )


def _message_of(exc_message: Any) -> str:
    # Celery stores an exception's args: usually a one-element list holding the message.
    if isinstance(exc_message, list | tuple):
        return ", ".join(str(part) for part in exc_message)
    return "" if exc_message is None else str(exc_message)
