"""The portable path: Celery's own (synchronous) client, run in worker threads.

Works with every broker kombu supports and under any anyio backend (asyncio, trio).
Broker and result-backend I/O never runs on the event-loop thread.
"""

from __future__ import annotations

import logging
from typing import Any

import amqp.exceptions
import anyio
import anyio.to_thread
from celery import Celery
from celery.backends.base import BaseKeyValueStoreBackend
from celery.result import AsyncResult
from kombu import Queue

from .._config import BridgeSettings, client_transport_options, kombu_url, scheme_of
from .._constants import (
    KOMBU_THREADS,
    PUBLISH_ATTEMPTS,
    PUBLISH_RETRY_POLICY,
    SERIALIZER,
)
from .._exceptions import ConfigurationError, DelegationError, ResultBackendError
from .._queues import QueuePlan
from .._signing import signing_app
from ._errors import UNBUILDABLE, translate, unbuildable
from ._threads import ThreadCalls
from .base import OutgoingMessage, PolledResultSource, Publisher, TaskOutcome, outcome_from_meta

logger = logging.getLogger(__name__)

_AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})


def client_app(settings: BridgeSettings, *, with_backend: bool, main: str) -> Celery:
    """A Celery app used only as a client: JSON only, bounded connect and publish times,
    signing what it sends when the settings have a signing key."""
    app = signing_app(
        main,
        settings,
        broker=kombu_url(settings.broker_url),
        backend=settings.result_backend if with_backend else None,
        set_as_current=False,
    )
    timeout = settings.publish_timeout
    transport_options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
    }
    if scheme_of(settings.broker_url) in _AMQP_SCHEMES:
        # Publisher confirms: basic_publish returns once RabbitMQ has taken the message.
        transport_options = {"confirm_publish": True, "connect_timeout": timeout}
    transport_options.update(client_transport_options(settings))
    app.conf.update(
        task_serializer=SERIALIZER,
        accept_content=[SERIALIZER],
        result_serializer=SERIALIZER,
        result_accept_content=[SERIALIZER],
        broker_connection_timeout=timeout,
        broker_transport_options=transport_options,
        result_backend_transport_options=settings.result_backend_transport_options,
        task_publish_retry_policy=dict(PUBLISH_RETRY_POLICY),
    )
    return app


def close_celery_app(app: Celery, *backends: Any) -> None:
    """Close an app's broker pools and the given result backends' connections (blocking).

    ``Celery.close()`` leaves a Redis result backend's connection pool and pub/sub
    subscription open until garbage collection. Backends are per thread in Celery
    (``app.backend``), so callers pass the instances they used; the calling thread's
    own is closed too.
    """
    app.close()
    # close() forgets the connection pool but not the producer pool built on it, so a
    # broker_url changed later would still be published to through the old broker
    # (Celery's own after-fork reset drops both).
    amqp = vars(app).get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    own = getattr(getattr(app, "_local", None), "backend", None)
    for backend in {id(b): b for b in (*backends, own) if b is not None}.values():
        consumer = getattr(backend, "result_consumer", None)
        # The rpc:// consumer's stop() fails unless it was started (no connection yet).
        started = getattr(consumer, "_connection", True) is not None
        if consumer is not None and hasattr(consumer, "stop") and started:
            consumer.stop()
            # An AsyncResult collected later unsubscribes from its channel in __del__,
            # which would reconnect the closed pub/sub and leak that socket.
            subscribed = getattr(consumer, "subscribed_to", None)
            if isinstance(subscribed, set):
                subscribed.clear()
        client = vars(backend).get("client")  # a cached property: only if it was created
        if client is not None:
            client.connection_pool.disconnect()


def key_value_backend(
    backend_url: str, *, io_timeout: float | None = None
) -> tuple[Celery, BaseKeyValueStoreBackend]:
    """Celery's result backend for ``backend_url``, JSON only; creating it connects nothing.

    Both result sources use it to name a task's key and to decode what a worker stored,
    so they read results exactly as Celery writes them. ``io_timeout`` bounds a Redis
    backend's connects and reads (Celery's defaults: none and 120 s).
    """
    app = Celery("celerybridge-results", backend=backend_url, set_as_current=False)
    app.conf.update(result_serializer=SERIALIZER, result_accept_content=[SERIALIZER])
    if io_timeout is not None:
        app.conf.update(redis_socket_connect_timeout=io_timeout, redis_socket_timeout=io_timeout)
    with translate(ConfigurationError, "setting up the result backend"):
        backend = app.backend
    if not isinstance(backend, BaseKeyValueStoreBackend):
        raise ConfigurationError(
            f"result backend {type(backend).__name__} is not a key/value store; "
            "use redis:// or file://"
        )
    return app, backend


class ExistingFirstQueue(Queue):
    """A kombu ``Queue`` declared the way the fast path declares (``amqp.ensure_queue``):
    a passive check first, and exchange, queue and binding only if it is missing.

    Each step runs on a short-lived channel of the same py-amqp connection: RabbitMQ
    closes a channel on every refusal (a missing queue's passive check among them), and
    py-amqp reopens a closed channel without its publisher confirms. kombu caches the
    declaration per connection, as for any queue (``maybe_declare``).
    """

    def declare(self, nowait: bool = False, channel: Any = None) -> str:
        bound: Any = channel or self.channel
        connection = bound.connection  # py-amqp's Connection
        if _queue_exists(connection, self.name):
            return str(self.name)
        scratch = connection.channel()
        try:
            super().declare(nowait=False, channel=scratch)
        except amqp.exceptions.PreconditionFailed as exc:
            if not _queue_exists(connection, self.name):
                raise self._refused(exc) from exc
            logger.info("queue %r was declared meanwhile by someone else: %s", self.name, exc)
        except amqp.exceptions.ChannelError as exc:
            raise self._refused(exc) from exc
        finally:
            _close(scratch)
        return str(self.name)

    def _refused(self, exc: amqp.exceptions.AMQPError) -> DelegationError:
        return DelegationError(
            f"RabbitMQ refused to declare queue {self.name!r} with arguments "
            f"{self.queue_arguments or {}}: {exc.reply_text}"
        )


def _queue_exists(connection: Any, queue: str) -> bool:
    """Whether ``queue`` exists: a passive declaration, on a channel of its own."""
    scratch = connection.channel()
    try:
        scratch.queue_declare(queue=queue, passive=True)
    except amqp.exceptions.NotFound:
        return False
    except amqp.exceptions.ChannelError as exc:  # locked (exclusive), access refused...
        raise DelegationError(
            f"RabbitMQ refused to check queue {queue!r}: {exc.reply_text}"
        ) from exc
    finally:
        _close(scratch)
    return True


def _close(channel: Any) -> None:
    # py-amqp reopens a channel RabbitMQ closed: close it either way.
    if channel.is_open:
        channel.close()


class KombuPublisher(Publisher):
    """Publishes with ``Celery.send_task`` in a worker thread.

    ``with_backend`` attaches the result backend, for the sync ``apply_async`` path
    whose callers expect a working ``AsyncResult.get()``; the async path leaves it off,
    so fire-and-forget creates no result-waiting state. ``reply_to`` names the bridge's
    ``rpc://`` reply queue (Celery's default: the app's per-thread oid).

    On RabbitMQ, a queue is published to as it exists, and declared as ``queues`` says
    only when it does not (:class:`ExistingFirstQueue`); on other brokers Celery
    declares it as it always does.
    """

    def __init__(
        self,
        settings: BridgeSettings,
        *,
        with_backend: bool = False,
        reply_to: str | None = None,
        queues: QueuePlan | None = None,
    ) -> None:
        self.settings = settings
        self._reply_to: dict[str, Any] = {} if reply_to is None else {"reply_to": reply_to}
        self._app = client_app(settings, with_backend=with_backend, main="celerybridge-publisher")
        self._queues = QueuePlan.from_settings(settings) if queues is None else queues
        self._on_amqp = scheme_of(settings.broker_url) in _AMQP_SCHEMES
        self._declarations: dict[str, Queue] = {}
        # One publish: up to PUBLISH_ATTEMPTS connects/sends, each bounded by the timeout.
        grace = settings.publish_timeout * PUBLISH_ATTEMPTS + 1
        self._threads = ThreadCalls(KOMBU_THREADS, DelegationError, grace=grace)

    @property
    def app(self) -> Celery:
        """The Celery client app this publisher sends with."""
        return self._app

    def data_backend(self) -> Any:
        """The app's result backend, made to read what it stored as data: a stored
        failure stays a record, its exception class is never imported."""
        from .celery_results import data_only

        return data_only(self._app.backend)

    def send(self, message: OutgoingMessage) -> AsyncResult[Any]:
        """Publish from the calling thread (blocking) and return Celery's handle."""
        doing = f"publishing {message.task_name!r} to {message.queue!r}"
        try:
            with translate(DelegationError, doing):
                return self._send_task(message)
        except UNBUILDABLE as exc:
            raise unbuildable(message.task_name, exc) from exc

    def _send_task(self, message: OutgoingMessage) -> AsyncResult[Any]:
        declare = None  # Celery's own, on other brokers than RabbitMQ
        if self._on_amqp:
            declare = [self._queue(message.queue)]
        return self._app.send_task(
            message.task_name,
            args=message.args,
            kwargs=message.kwargs,
            task_id=message.task_id,
            queue=message.queue,
            serializer=SERIALIZER,
            declare=declare,
            **self._reply_to,
            **message.options,
        )

    def _queue(self, name: str) -> Queue:
        queue = self._declarations.get(name)
        if queue is None:  # a race only builds the same queue twice
            queue = self._queues.declaration(name).kombu_queue(ExistingFirstQueue)
            self._declarations[name] = queue
        return queue

    async def publish(self, message: OutgoingMessage) -> None:
        await self._threads.run(self.send, message)

    def close(self) -> None:
        """Close the connection pool once no publish uses it any more (blocking)."""
        self._threads.close()
        close_celery_app(self._app)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)


class KombuResultSource(PolledResultSource):
    """Polls a key/value result backend (Redis, filesystem) with growing pauses.

    The stored JSON is decoded as data: exception classes named in it are never
    imported (CVE-2021-23727), which is why ``AsyncResult.get()`` is not used.
    """

    def __init__(self, backend_url: str, *, io_timeout: float) -> None:
        self._app, self._backend = key_value_backend(backend_url, io_timeout=io_timeout)
        self._threads = ThreadCalls(KOMBU_THREADS, ResultBackendError, grace=io_timeout + 1)

    def fetch(self, task_id: str) -> TaskOutcome | None:
        """Read the task's final outcome now, or ``None`` if it has none yet (blocking)."""
        with translate(ResultBackendError, f"reading the result of task {task_id}"):
            raw = self._backend.get(self._backend.get_key_for_task(task_id))
            if not raw:  # absent, or (file://) being written right now
                return None
            meta = self._backend.decode(raw)
        return outcome_from_meta(meta)

    async def poll(self, task_id: str) -> TaskOutcome | None:
        return await self._threads.run(self.fetch, task_id)

    def close(self) -> None:
        """Close the backend's connections once no fetch uses them any more (blocking)."""
        self._threads.close()
        close_celery_app(self._app, self._backend)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)
