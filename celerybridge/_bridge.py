"""The Bridge: connections to one broker and result backend, and delegation through them."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, overload

import anyio
import anyio.to_thread
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
from ._deadlines import Deadlines
from ._exceptions import (
    ConfigurationError,
    DelegationError,
    PublishTimeoutError,
    ResultBackendError,
    ResultTimeoutError,
)
from ._queues import QueuePlan
from ._registry import registry
from ._result import GroupHandle, TaskHandle
from ._signing import Signer
from ._transports.base import NativePublisher
from ._utils import Timeout, fail_after, to_seconds

if TYPE_CHECKING:
    from celery import Celery
    from celery.canvas import Signature, group

    from ._canvas import CanvasApp
    from ._contracts import RemoteTask
    from ._transports.base import OutgoingMessage, Publisher, ResultSource, TaskOutcome

R = TypeVar("R")


def _result_ids(result: Any) -> list[str]:
    from ._canvas import result_ids

    return list(result_ids(result))


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
        # A publisher on the event loop (asyncio only): no need to ask sniffio per call.
        self._native = isinstance(publisher, NativePublisher)
        self._deadlines = Deadlines(self.settings.publish_timeout)
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
        self._canvas: CanvasApp | None = None
        self._pid = os.getpid()
        self._loop: asyncio.AbstractEventLoop | None = None  # the asyncio loop it is used in
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
        self,
        name: str,
        /,
        *args: Any,
        version: int | str | None = None,
        send_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> TaskHandle[Any]:
        """Send the task ``name`` at ``version`` (default: the contract's default version).

        ``version`` is reserved for version selection and ``send_options`` for the
        options of :meth:`RemoteTask.with_options` (``{"countdown": 5}``): contracts may
        not name a parameter either way. Returns once the broker has accepted the message.
        """
        stub = registry.resolve(name, version)
        if send_options:
            stub = stub._with(send_options)
        return await self.send(stub, args, kwargs, stacklevel=2)

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
            if self._reply_to is not None:
                await self._prepare_results(f"task {stub.name!r} v{stub.version}", timeout)
            # On the event loop, one timer bounds every publish (``_deadlines``).
            limit = self._deadlines.bound() if self._native else fail_after(timeout)
            async with limit, publisher.admit():
                call = stub.bind(args, kwargs, stacklevel=stacklevel + 1)
                message = stub.message(call).from_service(self.settings.service)
                if self._reply_to is not None:  # rpc://: its reply will be kept
                    self._get_results().expect(message.task_id)
                await publisher.publish(message)
        except TimeoutError:
            what = f"task {stub.name!r} v{stub.version}"
            raise self._publish_timeout(what, message, timeout) from None
        return TaskHandle(self, stub, message.task_id)

    @overload
    async def send_canvas(self, workflow: group) -> GroupHandle: ...

    @overload
    async def send_canvas(self, workflow: Signature[Any]) -> TaskHandle[Any] | GroupHandle: ...

    async def send_canvas(self, workflow: Signature[Any]) -> TaskHandle[Any] | GroupHandle:
        """Publish a Celery workflow (a signature, ``chain``, ``group`` or ``chord`` of
        ``stub.s()`` / ``stub.si()`` and plain signatures) and return a handle to its
        final result.

        Every contract step is checked with the arguments it will be called with (the
        previous step's result first, in a chain) before anything is sent. Celery's own
        canvas code lays the workflow out (task ids, the ``chain``, ``callbacks`` and
        ``chord`` embeds, a chord's bookkeeping in the result backend); the bridge
        publishes the messages itself, each signed as a whole when a signing key is set.
        A chain or chord gives a :class:`TaskHandle` on its last task, typed by that
        task's contract (untyped JSON for a plain task); a group a :class:`GroupHandle`.
        A chord needs a result backend with chords (Redis, a database; not ``rpc://``).

        The messages are published one after another (a group's members, a chord's
        header): if the broker fails midway, those already sent stay sent, and the
        :class:`DelegationError` says how many there were.
        """
        from ._canvas import capture

        publisher = self._get_publisher()
        timeout = self.settings.publish_timeout
        app = self._canvas_app()
        result, messages = await anyio.to_thread.run_sync(capture, app, workflow)
        if self._reply_to is not None:
            await self._prepare_results("the workflow", timeout)
            for task_id in _result_ids(result):
                self._get_results().expect(task_id)
        native = self._native
        for sent, message in enumerate(messages):
            message = message.from_service(self.settings.service)
            what = f"task {message.task_name!r} of the workflow"
            if sent:  # what was sent stays sent: say so
                what += f" ({sent} of its {len(messages)} messages were sent before it)"
            try:
                async with fail_after(timeout, on_asyncio=native), publisher.admit():
                    await publisher.publish(message)
            except TimeoutError:
                raise self._publish_timeout(what, message, timeout) from None
            except DelegationError as exc:
                if not sent:
                    raise
                raise DelegationError(f"{what}: {exc}") from exc
        return self._canvas_handle(result, messages)

    def _canvas_handle(
        self, result: Any, messages: Sequence[OutgoingMessage]
    ) -> TaskHandle[Any] | GroupHandle:
        from celery.result import GroupResult

        from ._canvas import task_names, untyped_stub

        names = task_names(messages)

        def handle(result: Any) -> TaskHandle[Any] | GroupHandle:
            if isinstance(result, GroupResult):
                return GroupHandle(str(result.id), [handle(r) for r in result.results or ()])
            name = names.get(str(result.id), "celery.unknown")
            stub = registry.by_wire_name(name) or untyped_stub(name)
            return TaskHandle(self, stub, str(result.id))

        return handle(result)

    def _canvas_app(self) -> CanvasApp:
        if self._canvas is None:
            from ._canvas import CanvasApp

            self._canvas = CanvasApp(
                self.settings.result_backend, self._reply_to, self.settings.publish_timeout
            )
        return self._canvas

    @staticmethod
    def _publish_timeout(
        what: str, message: OutgoingMessage | None, timeout: float
    ) -> PublishTimeoutError:
        if message is None:
            return PublishTimeoutError(
                f"{what} waited {timeout:g} s for other publishes to make room and was not sent"
            )
        return PublishTimeoutError(
            f"the broker did not accept {what} ({message.task_id}) within {timeout:g} s; "
            "it may or may not have been delivered"
        )

    async def _prepare_results(self, what: str, timeout: float) -> None:
        """rpc://: declare the reply queue before the first task that names it is sent."""
        try:
            async with fail_after(timeout):
                await self._get_results().prepare()
        except TimeoutError:
            raise ResultBackendError(
                f"the rpc:// reply queue was not ready within {timeout:g} s; {what} was not sent"
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
        publisher, results, canvas = self._publisher, self._results, self._canvas
        self._publisher = self._results = self._canvas = None
        if canvas is not None:
            from ._transports.kombu import close_celery_app

            await anyio.to_thread.run_sync(close_celery_app, canvas, vars(canvas).get("_backend"))
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
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): its connections are not loop-bound
            return
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise ConfigurationError(
                "this bridge was first used in another event loop (its connections belong "
                "to that loop); create a bridge per event loop (e.g. in the app's lifespan, "
                "or in a fixture of the test's loop)"
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
            self._native = isinstance(self._publisher, NativePublisher)
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
