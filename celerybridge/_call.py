"""``celerybridge call``: one task from a shell, for operators.

Arguments arrive as JSON texts, are decoded strictly (no NaN, no infinities, no
integers of thousands of digits), validated against the contract as a worker validates
a message (``bytes`` as base64), then sent through a :class:`~celerybridge.Bridge`.
Every outcome maps to one exit code (:data:`EXIT_CODES`), documented in docs/cli.md.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ._bridge import Bridge
from ._contracts import RemoteTask
from ._exceptions import (
    CallError,
    CeleryBridgeError,
    ConfigurationError,
    DelegationError,
    RemoteTaskError,
    ResultError,
    ResultTimeoutError,
)
from ._registry import registry
from ._validation import MAX_DEPTH

EXIT_CODES: dict[type[BaseException], int] = {
    CallError: 3,  # refused before sending: unknown task or version, arguments
    DelegationError: 4,  # the broker did not accept the message (it may be unknown)
    RemoteTaskError: 5,  # the task ran and failed, or was dead-lettered
    ResultTimeoutError: 6,  # sent, but no result within --timeout
    ResultError: 7,  # sent, but the result backend failed
    ConfigurationError: 8,  # settings: broker URL, result backend
}
"""Exit codes by error class, most specific first in :func:`exit_code`'s lookup; 1 for
anything else (an unimportable module), 2 for usage errors (click's, bad JSON)."""


def exit_code(exc: BaseException) -> int:
    """The exit code for ``exc``: that of its nearest class in :data:`EXIT_CODES`."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


class BadJSON(ValueError):
    """An argument that is not JSON celerybridge sends (usage error, exit code 2)."""


def _constant(name: str) -> Any:
    raise BadJSON(f"{name} is not a JSON number celerybridge sends")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadJSON(f"{text[:40]} is too large for a 64-bit float")
    return value


def parse_json(text: str, what: str) -> Any:
    """``text`` decoded as strict JSON, or :class:`BadJSON` naming ``what`` it was."""
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_finite)
    except BadJSON as exc:
        raise BadJSON(f"{what}: {exc}") from None
    except RecursionError:
        raise BadJSON(f"{what}: nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise BadJSON(f"{what} is not JSON: {exc}") from None
    except ValueError:  # int()'s limit on digits
        limit = sys.get_int_max_str_digits()
        raise BadJSON(f"{what}: an integer of more than {limit} digits") from None
    return value


@dataclass(frozen=True, slots=True)
class Call:
    """A validated call: the stub (with its queue) and its arguments as Python values."""

    stub: RemoteTask[Any, Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """What the call is, as the command prints it."""
        return {
            "task": self.stub.name,
            "version": self.stub.version,
            "wire_name": self.stub.wire_name,
            "queue": self.stub.queue,
        }

    def wire(self) -> dict[str, Any]:
        """The arguments as they travel (JSON)."""
        bound = self.stub.binder.bind(self.args, self.kwargs)
        return {"args": list(bound.args), "kwargs": dict(bound.kwargs)}


def prepare(
    name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    version: int | None,
    queue: str | None,
    options: Mapping[str, Any] | None = None,
) -> Call:
    """Resolve and validate a call given as decoded JSON, or raise :class:`CallError`
    (:class:`ConfigurationError` for a bad option value).

    ``options`` are send options as decoded JSON (``--option NAME=JSON``), checked as
    ``delegate(send_options=...)`` checks them; ``eta`` and ``expires`` may be ISO 8601
    texts with a timezone (JSON has no dates).
    """
    stub = registry.resolve(name, version)
    given = {k: _moment(k, v) if k in _MOMENTS else v for k, v in (options or {}).items()}
    if queue is not None:
        given["queue"] = queue
    if given:
        stub = stub._with(given)
    received = stub.binder.receive(args, kwargs)  # JSON mode: bytes as base64, as a worker
    python_args, python_kwargs = stub.binder.call_arguments(received)
    return Call(stub, python_args, python_kwargs)


_MOMENTS = frozenset({"eta", "expires"})


def _moment(name: str, value: Any) -> Any:
    """``eta`` or ``expires`` given as an ISO 8601 text, as a datetime; other values as
    they are (a number of seconds for ``expires``; the option's check refuses the rest)."""
    if not isinstance(value, str):
        return value
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ConfigurationError(
            f"{name} must be an ISO 8601 date and time with a timezone, got {value!r:.80}"
        ) from None


async def send(
    call: Call, bridge: Bridge, *, wait: bool, timeout: float | None
) -> tuple[dict[str, Any], CeleryBridgeError | None]:
    """Send ``call``; with ``wait``, await its result. Returns the JSON the command
    prints and, once the task was sent, the error that ended the wait (if one did):
    the printed JSON then carries the task id, ``"state": "FAILURE"`` and the error.
    """
    handle = await bridge.send(call.stub, call.args, call.kwargs)
    out = {**call.describe(), "id": handle.id}
    if not wait:
        return out, None
    try:
        value = await handle.result(timeout=timeout)
    except CeleryBridgeError as exc:
        return {**out, "state": "FAILURE", "error": _error(exc)}, exc
    return {**out, "state": "SUCCESS", "result": call.stub.binder.dump_result(value)}, None


def _error(exc: CeleryBridgeError) -> dict[str, Any]:
    if isinstance(exc, RemoteTaskError):
        return {"type": exc.remote_type, "message": exc.remote_message}
    return {"type": type(exc).__name__, "message": str(exc)}
