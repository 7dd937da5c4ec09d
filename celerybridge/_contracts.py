"""Contracts: ``@remote_task`` stubs, typed with the signature of the remote task."""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, overload

from ._constants import DEFAULT_QUEUE, SEND_OPTIONS_KEYWORD, SERIALIZER, VERSION_KEYWORD
from ._exceptions import CallError, ConfigurationError, ContractError
from ._options import SendOptions, check_identifier, merge_options
from ._registry import registry
from ._transports.base import OutgoingMessage
from ._validation import Binder, BoundCall

if TYPE_CHECKING:
    from celery import Celery
    from celery.canvas import Signature

    from ._bridge import Bridge
    from ._result import ContractResult, TaskHandle

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


class RemoteTask(Generic[P, R]):
    """A contract for a task that runs in another service: a name, a queue, a version, a
    typed signature, and no body.

    Declare it with :func:`remote_task`. Call it with ``await stub.delegate(...)``
    (typed: mypy checks the arguments against the signature), or from sync code as the
    seed does, ``stub.apply_async(args, queue=..., serializer='json')`` or
    ``stub.delay(...)``. A worker implements it with :meth:`implement`.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str,
        version: int,
        queue: str,
        wire_name: str | None,
        default: bool,
        deprecated: bool | str,
    ) -> None:
        check_identifier("name", name)
        check_identifier("queue", queue)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ContractError(f"task {name!r}: version must be an integer >= 1, got {version!r}")
        self.name = name
        self.version = version
        # The seed's convention: v1 is sent under the plain name, vN under name_vN.
        self.wire_name = wire_name or (name if version == 1 else f"{name}_v{version}")
        check_identifier("wire_name", self.wire_name)
        self.default = default
        self.deprecated = deprecated
        self.qualname = f"{fn.__module__}.{fn.__qualname__}"
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        try:
            signature = inspect.signature(fn, eval_str=True)
        except NameError as exc:
            raise ContractError(
                f"task {name!r} v{version}: cannot resolve annotation: {exc}"
            ) from exc
        if VERSION_KEYWORD in signature.parameters:
            raise ContractError(
                f"task {name!r} v{version}: parameter name {VERSION_KEYWORD!r} is reserved "
                "for version selection in delegate(); rename the parameter"
            )
        if SEND_OPTIONS_KEYWORD in signature.parameters:
            raise ContractError(
                f"task {name!r} v{version}: parameter name {SEND_OPTIONS_KEYWORD!r} is "
                "reserved for send options in delegate(); rename the parameter"
            )
        self.binder = Binder(name, version, signature)
        self.options = SendOptions(queue=queue)
        self.bridge: Bridge | None = None
        """The bridge :meth:`delegate` uses; ``None``: the default bridge."""

    @property
    def queue(self) -> str:
        """The queue the task is sent to (and the worker consumes, ``-Q``)."""
        return self.options.queue

    def __repr__(self) -> str:
        where = f"wire={self.wire_name!r} queue={self.queue!r}"
        return f"<RemoteTask {self.name!r} v{self.version} {where}>"

    def with_options(
        self,
        *,
        queue: str | None = None,
        countdown: float | timedelta | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        priority: int | None = None,
        headers: Mapping[str, Any] | None = None,
        task_id: None = None,
        time_limit: float | timedelta | None = None,
        soft_time_limit: float | timedelta | None = None,
        retry: bool | None = None,
        retry_policy: Mapping[str, Any] | None = None,
        link: Signature[Any] | Sequence[Signature[Any]] | None = None,
        link_error: Signature[Any] | Sequence[Signature[Any]] | None = None,
    ) -> RemoteTask[P, R]:
        """A copy of this stub that sends with other delivery options, Celery's
        ``apply_async`` options (``None`` keeps the current value), checked now.

        ``countdown`` (seconds or a ``timedelta``) or ``eta`` (a timezone-aware datetime)
        delays execution; ``expires`` (seconds, a ``timedelta`` or an aware datetime, at
        most 49.7 days ahead) drops the task if it has not started in time; ``priority``
        is 0-9 (0 first on Redis, 9 first on RabbitMQ); ``headers`` are custom headers
        the task's request sees; ``time_limit`` and
        ``soft_time_limit`` bound the run on the worker; ``retry`` and ``retry_policy``
        are kombu's publish retries (kombu path); ``link`` and ``link_error`` are
        signatures called with the result or on failure.

        ``task_id`` is refused (:class:`CallError`): the copy sends every call with its
        options, and one id for two tasks loses a result. Give it per call:
        ``apply_async(task_id=...)``, ``signature(task_id=...)``,
        ``delegate(name, send_options={"task_id": ...})``.
        """
        if task_id is not None:
            raise CallError(
                f"task {self.name!r}: task_id is given per call (apply_async, signature, "
                "delegate(send_options=...)), not to with_options(), whose stub sends "
                "every call with it"
            )
        given = {
            "queue": queue,
            "countdown": countdown,
            "eta": eta,
            "expires": expires,
            "priority": priority,
            "headers": headers,
            "time_limit": time_limit,
            "soft_time_limit": soft_time_limit,
            "retry": retry,
            "retry_policy": retry_policy,
            "link": link,
            "link_error": link_error,
        }
        return self._with(given)

    def _with(self, options: Mapping[str, Any]) -> RemoteTask[P, R]:
        clone = copy.copy(self)
        clone.options = merge_options(self.name, self.options, options)
        return clone

    def via(self, bridge: Bridge) -> RemoteTask[P, R]:
        """A copy of this stub whose :meth:`delegate` sends through ``bridge``.

        The typed way to call with an explicit bridge, e.g. one from FastAPI's
        ``BridgeDep``: ``await send_to_s3.via(bridge).delegate(key, content)``.
        """
        clone = copy.copy(self)
        clone.bridge = bridge
        return clone

    def bind(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], *, stacklevel: int = 1
    ) -> BoundCall:
        """Validate a call (warning if this version is deprecated) without sending it.

        ``stacklevel`` is the frame the deprecation warning names: 1 is the caller.
        """
        self._warn_deprecated(stacklevel=stacklevel + 1)
        return self.binder.bind(args, kwargs)

    def _warn_deprecated(self, *, stacklevel: int) -> None:
        if self.deprecated:
            reason = f": {self.deprecated}" if isinstance(self.deprecated, str) else ""
            warnings.warn(
                f"task {self.name!r} v{self.version} is deprecated{reason}",
                DeprecationWarning,
                stacklevel=stacklevel + 1,
            )

    def message(self, call: BoundCall, task_id: str | None = None) -> OutgoingMessage:
        """The message that carries a validated call to the broker."""
        return OutgoingMessage.new(self.wire_name, call, self.options, task_id)

    async def delegate(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Send this task (through :meth:`via`'s bridge, else the default bridge) and
        return once the broker has accepted it."""
        bridge = self.bridge
        if bridge is None:
            from ._default import default_bridge

            bridge = await default_bridge()
        return await bridge.send(self, args, kwargs, stacklevel=2)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> ContractResult[R]:
        """Send from sync code, exactly as the seed does:
        ``send_to_s3.apply_async(args, queue='pusher', serializer='json')``.

        Arguments are validated first; only JSON is ever sent. ``options`` are those of
        :meth:`with_options`, and ``serializer`` (``"json"`` only). Returns a
        :class:`~celerybridge.ContractResult`: Celery's ``AsyncResult`` whose ``get()``
        decodes through the contract and raises :class:`RemoteTaskError`.
        """
        return self._apply(args, kwargs, options, stacklevel=2)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> ContractResult[R]:
        """Shortcut for ``apply_async(args, kwargs)``, as in Celery."""
        return self._apply(args, kwargs, {}, stacklevel=2)

    def _apply(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: dict[str, Any],
        *,
        stacklevel: int,
    ) -> ContractResult[R]:
        options = dict(options)
        serializer = options.pop("serializer", SERIALIZER)
        if serializer != SERIALIZER:
            raise ConfigurationError(f"celerybridge sends JSON only, not {serializer!r}")
        stub = self._with(options) if options else self
        call = stub.bind(tuple(args or ()), dict(kwargs or {}), stacklevel=stacklevel + 1)
        from ._default import sync_publisher
        from ._result import ContractResult

        publisher = sync_publisher()
        sent = publisher.send(stub.message(call).from_service(publisher.settings.service))
        return ContractResult(sent.id, stub, backend=publisher.data_backend(), app=publisher.app)

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """A Celery signature of this task, as Celery's ``task.s()``: for ``chain``,
        ``group``, ``chord``, ``link``.

        The arguments are validated now. They may leave out the first positional
        parameter, which the previous step of a chain fills (or a chord's header, or
        the task a callback is linked to); the rest are then checked against the
        parameters after it, and again when the workflow is sent.
        """
        self._warn_deprecated(stacklevel=2)
        from ._canvas import contract_signature

        return contract_signature(self, args, kwargs, {}, immutable=False)

    def si(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """An immutable signature (Celery's ``task.si()``): the complete call, typed;
        nothing before it in a workflow changes its arguments."""
        self._warn_deprecated(stacklevel=2)
        from ._canvas import contract_signature

        return contract_signature(self, args, kwargs, {}, immutable=True)

    def signature(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
        **options: Any,
    ) -> Signature[R]:
        """A signature with send options (those of :meth:`with_options`), as Celery's
        ``task.signature(args, kwargs, countdown=10)``; ``.s()`` or ``.si()`` otherwise."""
        self._warn_deprecated(stacklevel=2)
        from ._canvas import contract_signature

        return contract_signature(
            self, tuple(args or ()), dict(kwargs or {}), options, immutable=immutable
        )

    def implement(self, app: Celery | None = None, **task_options: Any) -> Callable[[F], F]:
        """Register the decorated function as this contract's implementation on ``app``.

        The Celery task gets this contract's wire name and queue; arguments are
        validated again on receipt. The signature is checked now: one that cannot
        accept the contract raises :class:`SignatureMismatchError`. ``async def``
        bodies run on the worker process's persistent event loop. ``app=None``
        registers on every Celery app (``shared_task``). Returns the function unchanged;
        the task is ``app.tasks[stub.wire_name]``.
        """
        from ._worker.app import register_implementation

        def decorator(fn: F) -> F:
            register_implementation(self, fn, app, task_options)
            return fn

        return decorator


class _Decorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> RemoteTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> RemoteTask[P, R]: ...


@overload
def remote_task(fn: Callable[P, Coroutine[Any, Any, R]], /) -> RemoteTask[P, R]: ...
@overload
def remote_task(fn: Callable[P, R], /) -> RemoteTask[P, R]: ...
@overload
def remote_task(
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    version: int = 1,
    wire_name: str | None = None,
    default: bool = False,
    deprecated: bool | str = False,
) -> _Decorator: ...
def remote_task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    version: int = 1,
    wire_name: str | None = None,
    default: bool = False,
    deprecated: bool | str = False,
) -> Any:
    """Declare a contract: the signature of a task another service implements.

    The body is never run (write ``...``). Versions of one logical ``name`` form its
    version map; ``delegate(name, ...)`` picks the version flagged ``default=True``,
    else the lowest. Version 1 is sent under ``name`` itself, version *n* under
    ``name_vn`` unless ``wire_name`` says otherwise; ``deprecated`` (``True`` or a
    reason) makes calls warn. Bare ``@remote_task`` names the task after its module and
    function and sends it to the ``celery`` queue.
    """

    def decorator(func: Callable[..., Any]) -> RemoteTask[Any, Any]:
        stub: RemoteTask[Any, Any] = RemoteTask(
            func,
            name=name or f"{func.__module__}.{func.__name__}",
            version=version,
            queue=queue,
            wire_name=wire_name,
            default=default,
            deprecated=deprecated,
        )
        registry.add(stub)
        return stub

    return decorator if fn is None else decorator(fn)
