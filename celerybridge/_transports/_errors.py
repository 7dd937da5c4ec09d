"""The one boundary where foreign exceptions become celerybridge errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiormq.exceptions
import amqp.exceptions
import celery.exceptions
import kombu.exceptions
import pamqp.exceptions
import redis.exceptions

from .._exceptions import CeleryBridgeError

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


@contextmanager
def translate(target: type[CeleryBridgeError], doing: str) -> Iterator[None]:
    """Re-raise any foreign error from the block as ``target``, chained with ``from``."""
    try:
        yield
    except CeleryBridgeError:
        raise
    except FOREIGN_ERRORS as exc:
        raise target(f"{doing}: {type(exc).__name__}: {exc}") from exc
