"""The one boundary where foreign exceptions become celerybridge errors."""

from __future__ import annotations

import struct

import aiormq.exceptions
import amqp.exceptions
import celery.exceptions
import kombu.exceptions
import pamqp.exceptions
import redis.exceptions

from .._exceptions import CeleryBridgeError, DelegationError

FOREIGN_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.KombuError,  # OperationalError, EncodeError, DecodeError, ContentDisallowed
    kombu.exceptions.HttpError,  # HTTP-based transports (SQS)
    amqp.exceptions.AMQPError,  # channel and connection errors from py-amqp
    amqp.exceptions.MessageNacked,  # RabbitMQ refused a confirmed publish
    aiormq.exceptions.AMQPError,  # aio-pika/aiormq: connection, channel, delivery (nack)
    aiormq.exceptions.ChannelInvalidStateError,  # aiormq: a closed channel (a RuntimeError)
    pamqp.exceptions.PAMQPException,  # aiormq's frame codec: unmarshalling, broker replies
    redis.exceptions.RedisError,  # connection, timeout and response errors from redis-py
    redis.exceptions.RedisClusterException,  # cluster routing (slots, cross-slot)
    redis.exceptions.ChildDeadlockedError,  # a pool used across fork
    redis.exceptions.IncorrectPolicyType,  # cluster request policies
    celery.exceptions.CeleryError,  # ImproperlyConfigured, QueueNotFound...
    celery.exceptions.BackendError,  # result backend get/store failures
    OSError,  # sockets: refused, reset, unreachable, DNS
)
"""Every family of exception our transports can see from the libraries they call."""

UNBUILDABLE: tuple[type[BaseException], ...] = (
    TypeError,  # a value JSON or AMQP's table encoder cannot carry
    ValueError,  # ... or one out of range, a property of the wrong kind; UnsignableError
    OverflowError,  # an integer too large for its AMQP field
    struct.error,  # ... as py-amqp's encoder reports it
    amqp.exceptions.FrameSyntaxError,  # a value py-amqp's table encoder has no type for
    RecursionError,  # a structure nested too deeply to encode
)
"""What building a message may raise when what it carries cannot be sent: the caller's
(or a ``before_task_publish`` receiver's) doing, not the broker's."""


def unbuildable(task_name: str, exc: BaseException) -> DelegationError:
    """The error for a message of ``task_name`` that ``exc`` (one of ``UNBUILDABLE``)
    kept from being built; nothing was sent."""
    return DelegationError(
        f"task {task_name!r} cannot be sent as built (a before_task_publish receiver may "
        f"have changed it): {type(exc).__name__}: {exc}"
    )


OPTIONAL_FOREIGN_PACKAGES = frozenset({"sqlalchemy", "psycopg2"})
"""Optional clients whose every exception is foreign too, known by the package that
defines it: Celery's database backend goes through SQLAlchemy, and psycopg2
(PostgreSQL) under it. Recognised by name, so neither is imported for it."""


def is_foreign(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a library we call (and is not one of ours)."""
    if isinstance(exc, CeleryBridgeError):
        return False
    if isinstance(exc, FOREIGN_ERRORS):
        return True
    package = type(exc).__module__.partition(".")[0]
    return package in OPTIONAL_FOREIGN_PACKAGES and isinstance(exc, Exception)


def translate(target: type[CeleryBridgeError], doing: str) -> _Translate:
    """Re-raise any foreign error from the ``with`` block as ``target``, chained with
    ``from``; celerybridge's own errors and anything else pass through."""
    return _Translate(target, doing)


class _Translate:
    # A class, not @contextmanager: it wraps every publish, and a generator costs more.
    __slots__ = ("doing", "target")

    def __init__(self, target: type[CeleryBridgeError], doing: str) -> None:
        self.target = target
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is not None and is_foreign(exc):
            raise self.target(f"{self.doing}: {type(exc).__name__}: {exc}") from exc
