"""One exception tree, and one boundary where every foreign exception is translated."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import aio_pika.exceptions
import aiormq.abc
import aiormq.exceptions
import amqp.exceptions
import celery.exceptions
import kombu.exceptions
import pamqp.exceptions
import psycopg2
import psycopg2.errors
import pytest
import redis.asyncio.client
import redis.asyncio.connection
import redis.asyncio.sentinel
import redis.exceptions
import sqlalchemy.exc
from aiormq import spec
from pamqp.header import ContentHeader

import celerybridge
from celerybridge import CeleryBridgeError, DelegationError, ResultBackendError
from celerybridge._transports._errors import translate

FOREIGN_MODULES = [
    kombu.exceptions,
    amqp.exceptions,
    redis.exceptions,
    celery.exceptions,
    # The fast path's redis-py asyncio modules, and what they raise besides redis.exceptions.
    redis.asyncio.client,
    redis.asyncio.connection,
    redis.asyncio.sentinel,
    # The AMQP fast path: aio-pika's own errors, aiormq's, and its codec pamqp's.
    aio_pika.exceptions,
    aiormq.exceptions,
    pamqp.exceptions,
    # Celery's database backend (db+postgresql://): SQLAlchemy, and psycopg2 under it.
    sqlalchemy.exc,
    psycopg2,
    psycopg2.errors,
]


def _foreign_classes() -> list[type[BaseException]]:
    classes = []
    for module in FOREIGN_MODULES:
        for _, value in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(value, Exception)
                and value.__module__.split(".")[0] == module.__name__.split(".")[0]
                # Warnings are warned, not raised; TaskPredicate is control flow inside a
                # worker; the command exception belongs to Celery's own CLI.
                and not issubclass(value, Warning | celery.exceptions.TaskPredicate)
                and value is not celery.exceptions.CeleryCommandException
            ):
                classes.append(value)
    return classes


def _returned() -> aiormq.abc.DeliveredMessage:
    frame = spec.Basic.Return(reply_code=312, reply_text="NO_ROUTE", routing_key="q")
    return aiormq.abc.DeliveredMessage(frame, ContentHeader(), b"", None)  # type: ignore[arg-type]


# Classes whose str() needs their real constructor arguments, as the library raises them.
REAL_INSTANCES: dict[type[BaseException], Callable[[], BaseException]] = {
    aiormq.exceptions.DeliveryError: lambda: aiormq.exceptions.DeliveryError(
        None, spec.Basic.Nack(delivery_tag=1)
    ),
    aiormq.exceptions.PublishError: lambda: aiormq.exceptions.PublishError(
        _returned(), _returned().delivery
    ),
    pamqp.exceptions.UnmarshalingException: lambda: pamqp.exceptions.UnmarshalingException(
        "ContentHeader", b"\x00"
    ),
}


def _instance(cls: type[BaseException]) -> BaseException:
    if cls in REAL_INSTANCES:
        return REAL_INSTANCES[cls]()
    # SQLAlchemy's errors about a statement carry it, as the database backend raises them.
    if issubclass(cls, sqlalchemy.exc.DBAPIError):
        return cls("SELECT 1", {}, Exception("boom"))
    if issubclass(cls, sqlalchemy.exc.StatementError):
        return cls("boom", "SELECT 1", {}, Exception("boom"))
    try:
        return cls("boom")
    except (TypeError, ValueError):  # some take several constructor arguments
        return cls.__new__(cls)


@pytest.mark.parametrize("cls", _foreign_classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
@pytest.mark.parametrize("target", [DelegationError, ResultBackendError])
def test_every_foreign_exception_is_translated(
    cls: type[BaseException], target: type[CeleryBridgeError]
) -> None:
    with pytest.raises(target) as caught, translate(target, "publishing 'x'"):
        raise _instance(cls)
    assert isinstance(caught.value.__cause__, cls)
    assert str(caught.value).startswith(f"publishing 'x': {cls.__name__}")


def test_socket_errors_are_translated() -> None:
    with pytest.raises(DelegationError) as caught, translate(DelegationError, "publishing 'x'"):
        raise ConnectionRefusedError(111, "Connection refused")
    assert (
        str(caught.value)
        == "publishing 'x': ConnectionRefusedError: [Errno 111] Connection refused"
    )


def test_our_errors_pass_through_untouched() -> None:
    error = ResultBackendError("inner")
    with pytest.raises(ResultBackendError) as caught, translate(DelegationError, "x"):
        raise error
    assert caught.value is error


def test_every_public_error_is_in_one_tree() -> None:
    errors = [
        getattr(celerybridge, name)
        for name in celerybridge.__all__
        if isinstance(getattr(celerybridge, name), type)
        and issubclass(getattr(celerybridge, name), BaseException)
    ]
    # The tree drawn in _exceptions' docstring (and the docs) names exactly these classes.
    import re

    from celerybridge import _exceptions

    drawn = set(re.findall(r"\b([A-Z]\w*Error)\b", _exceptions.__doc__ or "")) - {
        "ValueError",
        "LookupError",
        "TimeoutError",
    }
    assert drawn == {e.__name__ for e in errors}
    assert all(issubclass(e, CeleryBridgeError) for e in errors)
    assert issubclass(celerybridge.ResultTimeoutError, TimeoutError)
    assert issubclass(celerybridge.PublishTimeoutError, TimeoutError)
    assert issubclass(celerybridge.ArgumentError, ValueError)
    assert issubclass(celerybridge.UnknownTaskError, LookupError)


def test_argument_error_survives_pickling_for_celery_results() -> None:
    import pickle

    error = celerybridge.ArgumentError("t", 2, "p", "bad")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.task, copy.version, copy.parameter, str(copy)) == (
        "t",
        2,
        "p",
        "task 't' v2, parameter 'p': bad",
    )
