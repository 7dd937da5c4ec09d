"""The Bridge: connections to one broker and result backend, and delegation through them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, overload

import sniffio

from ._config import (
    AMQP_SCHEMES,
    FAST_PATH_BROKER_SCHEMES,
    FAST_PATH_RESULT_SCHEMES,
    KEY_VALUE_RESULT_SCHEMES,
    BridgeSettings,
    load_settings,
    result_backend_problem,
    scheme_of,
)
from ._constants import REDIS_WIRE_OPTIONS
from ._exceptions import (
    ConfigurationError,
    DelegationError,
    PublishTimeoutError,
    ResultBackendError,
    ResultTimeoutError,
)
from ._queues import QueuePlan
from ._registry import registry
from ._result import TaskHandle
from ._signing import Signer
from ._transports.base import NativePublisher
from ._utils import Timeout, fail_after, to_seconds

if TYPE_CHECKING:
    from celery import Celery

    from ._contracts import RemoteTask
    from ._transports.base import OutgoingMessage, Publisher, ResultSource, TaskOutcome

R = TypeVar("R")


class Bridge:
    """Connections to a broker and a result backend, and delegation through them.

    Build one per process (per event loop under pytest-asyncio) and close it with
    ``async with Bridge() as bridge:`` or ``await bridge.aclose()``. Settings come from
    ``CELERYBRIDGE_*`` variables, a :class:`BridgeSettings`, and keyword overrides, in
    rising priority. Connections are opened on first use, never on the event loop thread.

    ``publisher`` and ``results`` replace the transports, e.g. with
    :class:`~celerybridge.MemoryTransport` in a service's unit tests.

    Every result backend Celery can read by task id is awaited: Redis natively (pushed,
    pub/sub), ``rpc://`` natively on RabbitMQ (pushed to a reply queue of this bridge),
    the others (``db+postgresql://``, ``sentinel://``...) through Celery's own backend
    classes, polled in threads. One that cannot be (``cache+memory://``: in-process) is a
    :class:`ConfigurationError` here. With ``rpc://`` a result is a message consumed by
    the bridge that sent the task: a task sent by another bridge cannot be awaited.

    ``celery`` is a Celery app configured as the workers are (``task_queues``,
    ``task_default_queue_type``, ``task_create_missing_queue_type``,
    ``task_queue_max_priority``): on RabbitMQ a queue that does not exist yet is then
    declared as that app's workers declare it, unless ``CELERYBRIDGE_QUEUES`` names it.
    Only its queue definitions are read; it publishes nothing. See docs/delegation.md.
    """

    def __init__(
        self,
        settings: BridgeSettings | None = None,
        *,
        publisher: Publisher | None = None,
        results: ResultSource | None = None,
        celery: Celery | None = None,
        **overrides: Any,
    ) -> None:
        self.settings = load_settings(settings, **overrides)
        if results is None and (problem := result_backend_problem(self.settings)) is not None:
            raise ConfigurationError(problem)
        self._queues = QueuePlan.from_settings(self.settings, celery)
        self._publisher = publisher
        self._results = results
        # rpc://: the reply queue every task message names and the result source consumes.
        self._reply_to: str | None = None
        if results is None and scheme_of(self.settings.result_backend or "") == "rpc":
            if publisher is not None:
                raise ConfigurationError(
                    "result backend rpc:// needs the bridge's own publisher, which names the "
                    "bridge's reply queue in every message; pass results= along with "
                    "publisher=, or use another result backend"
                )
            self._reply_to = f"celerybridge.reply.{uuid.uuid4()}"
        self._pid = os.getpid()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Bridge {self.settings!r}{' closed' if self._closed else ''}>"

    async def delegate(
        self, name: str, /, *args: Any, version: int | str | None = None, **kwargs: Any
    ) -> TaskHandle[Any]:
        """Send the task ``name`` at ``version`` (default: the contract's default version).

        ``version`` is reserved for version selection: contracts may not name a
        parameter ``version``. Returns once the broker has accepted the message.
        """
        return await self.send(registry.resolve(name, version), args, kwargs, stacklevel=2)

    async def send(
        self,
        stub: RemoteTask[Any, R],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        stacklevel: int = 1,
    ) -> TaskHandle[R]:
        """Validate a call of ``stub`` and publish it; the typed core of :meth:`delegate`.

        ``stacklevel`` is the frame a deprecation warning names: 1 is the caller.
        """
        publisher = self._get_publisher()
        timeout = self.settings.publish_timeout
        message: OutgoingMessage | None = None
        try:
            native = isinstance(publisher, NativePublisher)  # asyncio only
            if self._reply_to is not None:
                await self._prepare_results(stub, timeout)
            async with fail_after(timeout, on_asyncio=native), publisher.admit():
                call = stub.bind(args, kwargs, stacklevel=stacklevel + 1)
                message = stub.message(call).from_service(self.settings.service)
                if self._reply_to is not None:  # rpc://: its reply will be kept
                    self._get_results().expect(message.task_id)
                await publisher.publish(message)
        except TimeoutError:
            if message is None:
                raise PublishTimeoutError(
                    f"task {stub.name!r} v{stub.version} waited {timeout:g} s for other "
                    "publishes to make room and was not sent"
                ) from None
            raise PublishTimeoutError(
                f"the broker did not accept task {stub.name!r} v{stub.version} "
                f"({message.task_id}) within {timeout:g} s; it may or may not have been delivered"
            ) from None
        return TaskHandle(self, stub, message.task_id)

    async def _prepare_results(self, stub: RemoteTask[Any, Any], timeout: float) -> None:
        """rpc://: declare the reply queue before the first task that names it is sent."""
        try:
            async with fail_after(timeout):
                await self._get_results().prepare()
        except TimeoutError:
            raise ResultBackendError(
                f"the rpc:// reply queue was not ready within {timeout:g} s; "
                f"task {stub.name!r} v{stub.version} was not sent"
            ) from None

    @overload
    def handle(self, task: RemoteTask[Any, R], task_id: str) -> TaskHandle[R]: ...
    @overload
    def handle(
        self, task: str, task_id: str, *, version: int | str | None = None
    ) -> TaskHandle[Any]: ...
    def handle(
        self, task: str | RemoteTask[Any, Any], task_id: str, *, version: int | str | None = None
    ) -> TaskHandle[Any]:
        """A handle for a task sent earlier, e.g. by id stored in a database.

        ``task`` is a contract name (with ``version``, default: the contract's default)
        or a stub; the handle decodes the result with that version's return type.
        """
        stub = registry.resolve(task, version) if isinstance(task, str) else task
        return TaskHandle(self, stub, task_id)

    async def poll(self, task_id: str) -> TaskOutcome | None:
        """The stored outcome of ``task_id`` if it has one now; used by :class:`TaskHandle`.

        One read, bounded by ``publish_timeout`` (the bridge's I/O timeout).
        """
        results = self._get_results()
        timeout = self.settings.publish_timeout
        try:
            async with fail_after(timeout):
                return await results.poll(task_id)
        except TimeoutError:
            raise ResultBackendError(
                f"the result backend did not answer within {timeout:g} s (task {task_id})"
            ) from None

    async def wait_for(
        self, stub: RemoteTask[Any, Any], task_id: str, timeout: Timeout | None
    ) -> TaskOutcome:
        """Wait for the stored outcome of ``task_id``; used by :class:`TaskHandle`."""
        seconds = to_seconds(timeout)
        limit = self.settings.result_timeout if seconds is None else seconds
        results = self._get_results()
        try:
            async with fail_after(limit):
                return await results.wait(task_id)
        except TimeoutError:
            raise ResultTimeoutError(stub.name, stub.version, task_id, limit) from None

    async def aclose(self) -> None:
        """Close the connections this bridge opened. Idempotent."""
        self._closed = True
        publisher, results = self._publisher, self._results
        self._publisher = self._results = None
        if publisher is not None:
            await publisher.aclose()
        if results is not None:
            await results.aclose()

    def _check_usable(self) -> None:
        if self._closed:
            raise DelegationError("this bridge is closed")
        if os.getpid() != self._pid:
            raise ConfigurationError(
                f"this bridge was created in process {self._pid} and used in {os.getpid()} "
                "after a fork; create a bridge in each process (e.g. in the app's lifespan)"
            )

    def _fast_path(self, url: str, schemes: frozenset[str]) -> bool:
        """Whether ``url`` gets a native asyncio client rather than kombu in threads.

        ``schemes`` are those with a native client (Redis and RabbitMQ brokers, Redis
        result backends), and only under asyncio: redis-py's async client and aio-pika
        do not run under trio, where the portable kombu path is taken automatically.
        """
        return (
            self.settings.fast_path
            and scheme_of(url) in schemes
            and sniffio.current_async_library() == "asyncio"
        )

    def _get_publisher(self) -> Publisher:
        self._check_usable()
        if self._publisher is None:
            url, timeout = self.settings.broker_url, self.settings.publish_timeout
            reply_to = self._reply_to
            # kombu's Redis transport options that change where and how messages are
            # written are kombu's alone: with any of them, kombu publishes.
            rewired = REDIS_WIRE_OPTIONS & self.settings.broker_transport_options.keys()
            if rewired or not self._fast_path(url, FAST_PATH_BROKER_SCHEMES):
                from ._transports.kombu import KombuPublisher

                self._publisher = KombuPublisher(
                    self.settings, reply_to=reply_to, queues=self._queues
                )
            elif scheme_of(url) in ("redis", "rediss"):
                from ._transports.redis import RedisPublisher

                self._publisher = RedisPublisher(
                    url,
                    timeout=timeout,
                    signer=Signer.from_settings(self.settings),
                    reply_to=reply_to,
                )
            else:
                from ._transports.amqp import AmqpPublisher

                self._publisher = AmqpPublisher(
                    url,
                    timeout=timeout,
                    signer=Signer.from_settings(self.settings),
                    reply_to=reply_to,
                    queues=self._queues,
                )
        return self._publisher

    def _get_results(self) -> ResultSource:
        self._check_usable()
        if self._results is None:
            if self.settings.result_backend is None:
                raise ConfigurationError(
                    "no result backend is configured; set CELERYBRIDGE_RESULT_BACKEND "
                    "(e.g. redis://127.0.0.1:6379/1) to await results"
                )
            self._results = self._result_source(self.settings.result_backend)
        return self._results

    def _result_source(self, backend: str) -> ResultSource:
        """The source that awaits results on ``backend``: pushed where a native client
        can be told (Redis pub/sub, rpc:// on RabbitMQ), polled in threads otherwise."""
        timeout = self.settings.publish_timeout
        if self._reply_to is not None:  # rpc://
            if self._fast_path(self.settings.broker_url, AMQP_SCHEMES):
                from ._transports.rpc_results import RpcResultSource

                return RpcResultSource(self.settings.broker_url, self._reply_to, timeout=timeout)
            from ._transports.celery_results import KombuRpcResultSource

            return KombuRpcResultSource(self.settings, self._reply_to)
        # Transport options (a key prefix...) are honoured by Celery's own backend class.
        plain = not self.settings.result_backend_transport_options
        if plain and self._fast_path(backend, FAST_PATH_RESULT_SCHEMES):
            from ._transports.redis_results import RedisResultSource

            return RedisResultSource(backend, timeout=timeout)
        if plain and scheme_of(backend) in KEY_VALUE_RESULT_SCHEMES:
            from ._transports.kombu import KombuResultSource

            return KombuResultSource(backend, io_timeout=timeout)
        from ._transports.celery_results import CeleryResultSource

        return CeleryResultSource(self.settings)
