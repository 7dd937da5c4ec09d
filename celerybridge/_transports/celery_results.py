"""Result backends awaited through Celery's own classes, polled in worker threads.

:class:`CeleryResultSource` reads any backend Celery knows by URL (``db+postgresql://``,
``db+sqlite://``, ``sentinel://``, ``mongodb://``...) with that backend's own
``_get_task_meta_for``, the one read ``AsyncResult.get()`` repeats, made to keep the
record as data: Celery would turn a stored failure back into an exception instance,
importing the module the record names (CVE-2021-23727), and its database backend would
unpickle a legacy row. :class:`KombuRpcResultSource` drains an ``rpc://`` reply queue
with kombu, on any broker (the native one, ``rpc_results``, needs asyncio and RabbitMQ).

Every read runs in a worker thread (``ThreadCalls``), never on the event loop; a waiter
polls with growing pauses, from ``POLL_INITIAL`` up to ``POLL_MAX`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import kombu
from celery import Celery

from .._config import BridgeSettings, client_transport_options, kombu_url, scheme_of
from .._constants import (
    KOMBU_THREADS,
    POLL_INITIAL,
    RPC_DRAIN_LIMIT,
    RPC_REPLY_QUEUE_EXPIRES,
    SERIALIZER,
)
from .._exceptions import ConfigurationError, ResultBackendError
from ._errors import translate
from ._replies import Replies, decode_reply
from ._threads import ThreadCalls
from .base import PolledResultSource, TaskOutcome, outcome_from_meta

logger = logging.getLogger(__name__)


def _as_data(meta: Any) -> Any:
    return meta


def data_only(backend: Any) -> Any:
    """``backend``, made to return what it stored as data (patched on the instance).

    ``meta_from_decoded`` and ``exception_to_python`` would rebuild a stored failure as
    an instance of the class it names, importing its module; the database backend's
    ``_decode_stored_result`` would fall back to ``pickle.loads`` for a row that is not
    JSON. Here the record stays a dict, and only JSON is read (``result_accept_content``).
    """
    backend.meta_from_decoded = _as_data
    backend.exception_to_python = _as_data
    if hasattr(backend, "_decode_stored_result"):
        backend._decode_stored_result = backend.decode
    return backend


def _close_backend(app: Celery, backend: Any) -> None:
    """Release what a backend holds: pooled engines (database), clients (others)."""
    manager = getattr(backend, "session_manager", None)
    if manager is not None:
        for engine in list(getattr(manager, "_engines", {}).values()):
            engine.dispose()
        manager._engines.clear()
        manager._sessions.clear()
    client = vars(backend).get("client")  # a cached property: only if it was created
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.disconnect()
    app.close()


def _undecompressed(message: type[Any]) -> type[Any]:
    """kombu's message class for a channel, minus its decompression: kombu inflates a
    body whose headers name a ``compression`` as it builds the message, before anyone
    can look at its size (a zip bomb). The body is kept as it came; ``decode_reply``
    refuses compressed replies."""

    class Undecompressed(message):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Message.__init__ skips decompressing (and re-encoding) once it has errors.
            self.errors = [_KEPT_RAW]
            super().__init__(*args, **kwargs)
            self.errors = []

    return Undecompressed


_KEPT_RAW = (None, None, None)


class CeleryResultSource(PolledResultSource):
    """Polls a result backend through Celery's own class for it, in worker threads.

    The backend is created in a thread on first use (the database backend connects, and
    may create its tables, when it is created); its records stay data (:func:`data_only`).
    """

    def __init__(self, settings: BridgeSettings) -> None:
        backend_url = settings.result_backend
        assert backend_url is not None
        self._url = backend_url
        self._io_timeout = settings.publish_timeout
        self._app = Celery("celerybridge-results", backend=backend_url, set_as_current=False)
        conf: dict[str, Any] = {
            "result_serializer": SERIALIZER,
            "result_accept_content": [SERIALIZER],
            "result_backend_transport_options": settings.result_backend_transport_options,
            "redis_socket_connect_timeout": self._io_timeout,
            "redis_socket_timeout": self._io_timeout,
        }
        if scheme_of(backend_url).startswith("db+postgresql"):
            # libpq's connect timeout, in whole seconds (Celery's default: none).
            connect = {"connect_timeout": max(1, round(self._io_timeout))}
            conf["database_engine_options"] = {"connect_args": connect}
        self._app.conf.update(conf)
        self._backend: Any = None
        self._creating = threading.Lock()
        self._threads = ThreadCalls(KOMBU_THREADS, ResultBackendError, grace=self._io_timeout + 1)

    def backend(self) -> Any:
        """Celery's backend object, created on first use (blocking)."""
        with self._creating:
            if self._backend is None:
                with translate(ConfigurationError, "setting up the result backend"):
                    backend = self._app.backend
                if not callable(getattr(backend, "_get_task_meta_for", None)):
                    raise ConfigurationError(
                        f"result backend {type(backend).__name__} cannot be read by task id; "
                        "use redis://, rpc:// or db+postgresql://"
                    )
                manager = getattr(backend, "session_manager", None)
                if manager is not None:
                    # Celery's SessionManager pools connections only in a forked worker
                    # child; a client that polls would otherwise connect for every read.
                    manager.forked = True
                self._backend = data_only(backend)
            return self._backend

    def fetch(self, task_id: str) -> TaskOutcome | None:
        """Read the task's final outcome now, or ``None`` if it has none yet (blocking)."""
        backend = self.backend()
        with translate(ResultBackendError, f"reading the result of task {task_id}"):
            meta = backend._get_task_meta_for(task_id)
        return outcome_from_meta(meta)

    async def poll(self, task_id: str) -> TaskOutcome | None:
        return await self._threads.run(self.fetch, task_id)

    def close(self) -> None:
        """Close the backend's connections once no read uses them any more (blocking)."""
        self._threads.close()
        with self._creating:
            backend, self._backend = self._backend, None
        if backend is not None:
            _close_backend(self._app, backend)
        else:
            self._app.close()

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)


class KombuRpcResultSource(PolledResultSource):
    """Drains the bridge's ``rpc://`` reply queue with kombu, in worker threads.

    For every broker kombu supports and under any anyio backend. Waiters poll; one
    drain at a time reads every reply on the queue (``basic_get``) into the kept replies
    (``_replies.Replies``), whichever task they are for. The queue is declared as Celery
    declares its own, and deleted on close.
    """

    def __init__(self, settings: BridgeSettings, reply_to: str) -> None:
        self.reply_to = reply_to
        self._io_timeout = settings.publish_timeout
        options: dict[str, Any] = {
            "socket_connect_timeout": self._io_timeout,
            "socket_timeout": self._io_timeout,
            "connect_timeout": self._io_timeout,
            **client_transport_options(settings),
        }
        self._connection = kombu.Connection(
            kombu_url(settings.broker_url),
            transport_options=options,
            connect_timeout=self._io_timeout,
        )
        self._queue = kombu.Queue(
            reply_to,
            kombu.Exchange(""),  # Celery's Exchange(None): the default exchange
            routing_key=reply_to,
            durable=True,
            auto_delete=True,
            expires=RPC_REPLY_QUEUE_EXPIRES,
        )
        self._bound: kombu.Queue | None = None
        self._replies = Replies()
        self._drain_lock = threading.Lock()  # one kombu channel: one drain at a time
        self._drained_at = 0.0
        self._threads = ThreadCalls(KOMBU_THREADS, ResultBackendError, grace=self._io_timeout + 1)

    def _declare(self) -> kombu.Queue:
        if self._bound is None:
            with translate(ResultBackendError, f"declaring the reply queue {self.reply_to}"):
                channel: Any = self._connection.default_channel
                channel.Message = _undecompressed(type(channel).Message)
                bound = self._queue(channel)
                bound.declare()
            self._bound = bound
        return self._bound

    def declare(self) -> None:
        """Declare the reply queue if not yet done (blocking)."""
        with self._drain_lock:
            self._declare()

    def drain(self, task_id: str) -> TaskOutcome | None:
        """Read every reply waiting on the queue, then the task's outcome if any (blocking).

        A drain finished less than ``POLL_INITIAL`` seconds ago is not repeated: many
        waiters share one.
        """
        with self._drain_lock:
            if time.monotonic() - self._drained_at >= POLL_INITIAL:
                try:
                    self._drain()
                except ResultBackendError:
                    # The next drain connects again and declares the queue again.
                    self._bound = None
                    self._connection.collect()
                    raise
                self._drained_at = time.monotonic()
            return self._replies.get(task_id)

    def _drain(self) -> None:
        bound = self._declare()
        with translate(ResultBackendError, f"reading the reply queue {self.reply_to}"):
            for _ in range(RPC_DRAIN_LIMIT):
                message = bound.get(no_ack=True, accept=[SERIALIZER])
                if message is None:
                    break
                body = message.body or b""
                try:
                    meta = decode_reply(
                        body.encode() if isinstance(body, str) else body,
                        message.content_type,
                        message.content_encoding,
                        message.headers,
                    )
                except ResultBackendError as exc:  # not a reply: nobody's result to fail
                    logger.warning("ignored a message on %s: %s", self.reply_to, exc)
                    continue
                if meta is not None:
                    self._replies.add(message.properties.get("correlation_id"), meta)

    async def prepare(self) -> None:
        if self._bound is None:
            await self._threads.run(self.declare)

    def expect(self, task_id: str) -> None:
        # Called on the event loop: never waits for a drain (Replies has its own lock).
        self._replies.expect(task_id)

    async def poll(self, task_id: str) -> TaskOutcome | None:
        return await self._threads.run(self._expect_and_drain, task_id)

    def _expect_and_drain(self, task_id: str) -> TaskOutcome | None:
        self.expect(task_id)
        return self.drain(task_id)

    def close(self) -> None:
        """Delete the reply queue and close the connection (blocking)."""
        self._threads.close()
        with self._drain_lock:
            bound, self._bound = self._bound, None
            try:
                if bound is not None:
                    # Never consumed, auto_delete would not drop it: x-expires would, in a day.
                    with translate(ResultBackendError, f"deleting the reply queue {self.reply_to}"):
                        bound.delete()
            except ResultBackendError:
                pass
            finally:
                self._connection.release()

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self.close)
