"""Every error celerybridge raises, provoked on purpose, with its exact message.

Uses ``MemoryTransport`` and a few stand-ins, so no broker is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from bindings import purge, send_to_s3_v2
from celery import Celery

from celerybridge import (
    ArgumentError,
    Bridge,
    CallError,
    CeleryBridgeError,
    ConfigurationError,
    ContractError,
    DelegationError,
    MemoryTransport,
    OutgoingMessage,
    Publisher,
    PublishTimeoutError,
    ResultBackendError,
    ResultError,
    SignatureMismatchError,
    UnknownTaskError,
    UnknownVersionError,
    remote_task,
)


@contextmanager
def expect(error: type[Exception], message: str) -> Iterator[None]:
    """Fail unless the block raises ``error`` with exactly ``message``."""
    try:
        yield
    except error as exc:
        assert str(exc) == message, f"{type(exc).__name__}: {exc}"
    else:
        raise AssertionError(f"{error.__name__} was not raised")


# --8<-- [start:metrics]
@remote_task(name="metrics.record", queue="metrics")
def record(name: str, value: float, labels: Any = None) -> None: ...


# --8<-- [end:metrics]


# --8<-- [start:stuck-broker]
class StuckBroker(Publisher):
    """A broker that never confirms a message."""

    async def publish(self, message: OutgoingMessage) -> None:
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        pass


# --8<-- [end:stuck-broker]


async def main() -> None:
    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        # --8<-- [start:call-errors]
        try:
            await bridge.delegate("pusher.purge", "tmp/", "last week")
        except ArgumentError as exc:  # also a ValueError
            assert (exc.task, exc.version, exc.parameter) == ("pusher.purge", 1, "older_than")
            assert str(exc) == (
                "task 'pusher.purge' v1, parameter 'older_than': Input should be a valid "
                "datetime or date, input is too short (got 'last week')"
            )
        # --8<-- [end:call-errors]
        else:
            raise AssertionError("ArgumentError was not raised")

        # --8<-- [start:lookups]
        with expect(
            UnknownTaskError, "unknown task 'pusher.send_to_S3'; did you mean 'pusher.send_to_s3'?"
        ):
            await bridge.delegate("pusher.send_to_S3", "k", "c")
        with expect(
            UnknownTaskError,
            "unknown task 'thumbnails.resize'; is the bindings module that declares it imported?",
        ):
            await bridge.delegate("thumbnails.resize", "k")
        with expect(
            UnknownVersionError, "task 'pusher.send_to_s3' has no version 3; known versions: 1, 2"
        ):
            await bridge.delegate("pusher.send_to_s3", "k", "c", version=3)
        # --8<-- [end:lookups]

        # --8<-- [start:json-only]
        with expect(
            ArgumentError,
            "task 'metrics.record' v1, parameter 'value': "
            "Input should be a finite number (got nan)",
        ):
            await bridge.delegate("metrics.record", "load", float("nan"))
        with expect(
            ArgumentError,
            "task 'metrics.record' v1, parameter 'labels': "
            "inf is not a finite number; JSON cannot carry it",
        ):
            await bridge.delegate("metrics.record", "load", 1.0, labels={"max": float("inf")})
        with expect(
            ArgumentError,
            "task 'metrics.record' v1, parameter 'labels': set is not JSON-serialisable",
        ):
            await bridge.delegate("metrics.record", "load", 1.0, labels={"a", "b"})
        with expect(
            ArgumentError,
            "task 'metrics.record' v1, parameter 'labels': object key 1 is not a string",
        ):
            await bridge.delegate("metrics.record", "load", 1.0, labels={1: "a"})
        with expect(
            ArgumentError,
            "task 'metrics.record' v1, parameter 'labels': integer outside the signed 64-bit "
            "range (-2**63 to 2**63-1); most JSON peers cannot carry it",
        ):
            await bridge.delegate("metrics.record", "load", 1.0, labels={"id": 2**64})
        # --8<-- [end:json-only]
        assert transport.messages == []  # nothing refused ever reached the broker

        # --8<-- [start:result-errors]
        handle = await bridge.send(purge, ("tmp/", "2024-01-01T00:00:00"), {})
        transport.set_result(handle.id, "many")  # the worker returned something else
        with expect(
            ResultError,
            f"task 'pusher.purge' v1 ({handle.id}) returned a value that does not match its "
            "contract: Input should be a valid integer, unable to parse string as an integer",
        ):
            await handle
        with expect(ConfigurationError, "timeout must be a positive, finite duration, got 0"):
            await handle.result(timeout=0)
        # --8<-- [end:result-errors]

    # --8<-- [start:closed]
    with expect(DelegationError, "this bridge is closed"):
        await bridge.delegate("pusher.purge", "tmp/", "2024-01-01T00:00:00")
    # --8<-- [end:closed]

    # --8<-- [start:catch-builtins]
    async with Bridge(publisher=StuckBroker(), publish_timeout=0.05) as stuck:
        try:
            await stuck.send(purge, ("tmp/", "2024-01-01T00:00:00"), {})
        except TimeoutError as exc:  # PublishTimeoutError is a DelegationError and a TimeoutError
            assert isinstance(exc, PublishTimeoutError)
            assert str(exc).startswith("the broker did not accept task 'pusher.purge' v1 (")
            assert str(exc).endswith(") within 0.05 s; it may or may not have been delivered")
        # --8<-- [end:catch-builtins]
        else:
            raise AssertionError("PublishTimeoutError was not raised")

    for error in (UnknownTaskError, UnknownVersionError, ArgumentError):
        assert issubclass(error, CallError)
    assert issubclass(UnknownTaskError, LookupError)
    assert issubclass(UnknownVersionError, LookupError)
    assert issubclass(ArgumentError, ValueError)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(SignatureMismatchError, ContractError)
    assert issubclass(ResultBackendError, ResultError)
    assert all(
        issubclass(error, CeleryBridgeError)
        for error in (CallError, ContractError, DelegationError, ResultError, ConfigurationError)
    )

    # --8<-- [start:foreign]
    # Nothing listens on port 1: redis' (or, off the fast path, kombu's) errors arrive translated.
    async with Bridge(broker_url="redis://127.0.0.1:1/0", publish_timeout=5) as unreachable:
        try:
            await unreachable.send(purge, ("tmp/", "2024-01-01T00:00:00"), {})
        except DelegationError as exc:
            assert str(exc).startswith("publishing 'pusher.purge' to 'pusher': ConnectionError: ")
            assert type(exc.__cause__).__module__ == "redis.exceptions"  # raise ... from exc
        # --8<-- [end:foreign]
        else:
            raise AssertionError("DelegationError was not raised")

    memory = MemoryTransport(execute=False)
    async with Bridge(publisher=memory, result_backend="redis://127.0.0.1:1/0") as no_backend:
        handle = await no_backend.send(purge, ("tmp/", "2024-01-01T00:00:00"), {})
        try:
            await handle.result(timeout=5)
        except ResultBackendError as exc:
            assert str(exc).startswith(
                f"subscribing to the result of task {handle.id}: ConnectionError"
            )
        else:
            raise AssertionError("ResultBackendError was not raised")

    # --8<-- [start:config]
    with expect(
        ConfigurationError,
        "invalid celerybridge settings: CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS "
        "(broker_transport_options): a sentinel:// broker needs the name of the Redis master "
        "its Sentinels watch: set CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS="
        """'{"master_name": "mymaster"}' (the name in the Sentinels' configuration)""",
    ):
        Bridge(broker_url="sentinel://127.0.0.1:26379")
    with expect(
        ConfigurationError,
        "result backend cache+memory:// keeps results in the memory of each process, so a "
        "worker's results never reach this bridge; use redis://, rpc:// (with RabbitMQ) or "
        "db+postgresql:// instead",
    ):
        Bridge(result_backend="cache+memory://")
    with expect(
        ConfigurationError,
        "invalid celerybridge settings: CELERYBRIDGE_PUBLISH_TIMEOUT (publish_timeout): "
        "Input should be greater than 0",
    ):
        Bridge(publish_timeout=0)
    async with Bridge(publisher=memory) as fire_only:
        handle = await fire_only.send(purge, ("tmp/", "2024-01-01T00:00:00"), {})
        with expect(
            ConfigurationError,
            "no result backend is configured; set CELERYBRIDGE_RESULT_BACKEND "
            "(e.g. redis://127.0.0.1:6379/1) to await results",
        ):
            await handle
    # --8<-- [end:config]

    # --8<-- [start:contract-errors]
    with expect(
        ContractError,
        "task 'pusher.resize' v1: parameter name 'version' is reserved for version "
        "selection in delegate(); rename the parameter",
    ):

        @remote_task(name="pusher.resize", queue="pusher")
        def resize(key: str, version: int) -> None: ...

    app = Celery("pusher", set_as_current=False)
    try:
        purge.implement(app)(purge_everything)  # what @purge.implement(app) does
    except SignatureMismatchError as exc:  # a ContractError, raised when the worker imports
        message = str(exc)
        assert message.startswith("purge_everything cannot implement task 'pusher.purge' v1: ")
        assert message.endswith("positionally: too many positional arguments")
    # --8<-- [end:contract-errors]
    else:
        raise AssertionError("SignatureMismatchError was not raised")
    assert "pusher.purge" not in app.tasks

    # send_to_s3_v2 is used by name above; keep the import honest.
    assert send_to_s3_v2.version == 2


def purge_everything(prefix: str) -> int:
    return 0


if __name__ == "__main__":
    asyncio.run(main())
