"""The worker side: registering implementations of contracts on a Celery app."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Celery, current_task, shared_task
from celery.app.amqp import Queues
from celery.exceptions import Ignore
from kombu import Queue

from .._config import BridgeSettings, client_transport_options, kombu_url, load_settings
from .._constants import SERIALIZER, SERVICE_HEADER
from .._exceptions import ConfigurationError, ContractError, SignatureMismatchError
from .._registry import registry
from .._signing import signing_app
from .dead_letter import DeadLetterTask
from .final_state import FinalStateLoader
from .intake import CONSUMER, MAX_BYTES_OPTION, intake_transport
from .loop import worker_loop
from .pool.context import terminated_in_thread
from .redis_transport import MAX_DELIVERIES_OPTION
from .wakeup import SignalWakeup

if TYPE_CHECKING:
    from .._contracts import RemoteTask

_JSON_ONLY = {
    "task_serializer": SERIALIZER,
    "result_serializer": SERIALIZER,
    "accept_content": [SERIALIZER],
    "result_accept_content": [SERIALIZER],
}


T = TypeVar("T")

_caller_service: ContextVar[str | None] = ContextVar("celerybridge_caller_service", default=None)


def caller_service() -> str | None:
    """The name of the service that sent the task being run (its bridge's
    ``CELERYBRIDGE_SERVICE``), or ``None`` if it did not say (or outside a task).

    Inside an implementation's body only. The name is whatever the sender put in the
    message: trust it as far as you trust your senders, or sign messages
    (``CELERYBRIDGE_SIGNING_KEY``), which covers it.
    """
    return _caller_service.get()


def _header(name: str) -> str | None:
    """A custom header of the message the current Celery task came in."""
    if not current_task:  # a proxy, false outside a task
        return None
    value = current_task.request.get(name)
    return None if value is None else str(value)


async def _as_service(service: str | None, body: Coroutine[Any, Any, T]) -> T:
    # Runs as the task on the worker loop: the variable is set in that task's context.
    _caller_service.set(service)
    return await body


def celery_app(main: str, settings: BridgeSettings | None = None, **conf: Any) -> Celery:
    """A Celery app for a worker, configured from the same ``CELERYBRIDGE_*`` settings
    as the bridge, accepting JSON only. Every message passes its intake gate
    (:mod:`celerybridge._worker.intake`) before Celery reads it; what the gate or Celery cannot
    accept goes to ``<queue>.dead``. ``conf`` adds Celery settings.

    With ``CELERYBRIDGE_SIGNING_KEY`` set, the worker runs only messages signed with
    that key within ``CELERYBRIDGE_SIGNING_MAX_AGE`` seconds; the rest go to
    ``<queue>.dead`` too. What the app sends itself (retries) is signed.

    The worker declares the queues ``CELERYBRIDGE_QUEUES`` names with those arguments
    (over Celery's ``task_queues``), and the others as Celery does, with
    ``CELERYBRIDGE_DEFAULT_QUEUE_TYPE`` as Celery's ``task_create_missing_queue_type`` and
    ``task_default_queue_type`` unless ``conf`` sets them: workers and bridges configured
    alike declare queues alike, whichever starts first.

    On a Redis broker the worker takes messages with celerybridge's reliable transport: a
    message is popped and recorded as unacknowledged in one step, the records of running
    tasks are kept fresh, and a message delivered more than ``CELERYBRIDGE_MAX_DELIVERIES``
    times is dead-lettered (docs/reliability.md)."""
    settings = load_settings(settings)
    if conf.get("task_compression"):
        # The intake gate reads uncompressed JSON only (and signatures cover the body as
        # serialised): a worker's own retries and sends would all be dead-lettered.
        raise ConfigurationError(
            "celery_app() does not support task_compression: workers accept uncompressed "
            "JSON messages only, and would dead-letter their own retries"
        )
    # The loader guards the result backend: no late RETRY over a FAILURE (_final_state.py).
    app = signing_app(
        main,
        settings,
        broker=kombu_url(settings.broker_url),
        backend=settings.result_backend,
        loader=FinalStateLoader,
    )
    transport_options = {
        **client_transport_options(settings),
        MAX_BYTES_OPTION: settings.max_message_bytes,
        MAX_DELIVERIES_OPTION: settings.max_deliveries,
        **conf.pop("broker_transport_options", {}),
    }
    conf.setdefault("worker_consumer", CONSUMER)
    if settings.signing_key is not None:
        # Celery's remote control (revoke, shutdown, cancel_consumer...) is not signed:
        # a worker that runs only signed tasks does not obey it unless asked to.
        conf.setdefault("worker_enable_remote_control", False)
    transport = intake_transport(settings.broker_url)
    if transport is not None:
        conf.setdefault("broker_transport", transport)
    conf.setdefault("result_backend_transport_options", settings.result_backend_transport_options)
    conf.setdefault("task_create_missing_queue_type", settings.default_queue_type)
    conf.setdefault("task_default_queue_type", settings.default_queue_type)
    app.conf.update(_JSON_ONLY, broker_transport_options=transport_options, **conf)
    if settings.queues:
        app.amqp.queues_cls = _queues_with(settings.queues)
    app.steps["consumer"].add(SignalWakeup)  # SIGTERM: the shutdown starts at once
    return app


def _queues_with(arguments: dict[str, dict[str, Any]]) -> type[Queues]:
    """Celery's ``Queues``, declaring the queues ``arguments`` names (``CELERYBRIDGE_QUEUES``)
    with exactly those arguments, as a bridge declares them: whether ``task_queues``
    defines them, ``-Q`` creates them or they are Celery's default queue."""

    class BridgeQueues(Queues):
        def __setitem__(self, name: str, queue: Queue) -> None:
            super().__setitem__(name, queue)
            if name in arguments:  # after Celery's own (task_queue_max_priority)
                queue.queue_arguments = dict(arguments[name]) or None

    return BridgeQueues


def check_signature(stub: RemoteTask[Any, Any], fn: Callable[..., Any]) -> str | None:
    """Why ``fn`` cannot accept every call of ``stub`` (positionally as the seed sends,
    and by keyword as ``send_task(kwargs=...)`` does), or ``None`` if it can."""
    contract = stub.binder.signature
    try:
        impl = inspect.signature(fn, eval_str=True)
    except NameError:
        impl = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        return f"its signature cannot be read: {exc}"
    positional = [object()] * len(stub.binder.positional)
    keyword_only = {n: object() for n in contract.parameters if n not in stub.binder.positional}
    by_name = {
        n: object()
        for n, p in contract.parameters.items()
        if p.kind is not inspect.Parameter.POSITIONAL_ONLY
    }
    by_position = {n: object() for n in contract.parameters if n not in by_name}
    for how, args, kwargs in (
        ("positionally", positional, keyword_only),
        ("by keyword", list(by_position.values()), by_name),
    ):
        try:
            impl.bind(*args, **kwargs)
        except TypeError as exc:
            return f"{fn.__qualname__}{impl} cannot take the arguments of {contract} {how}: {exc}"
    return None


def _route(app: Celery, task_name: str, queue: str) -> None:
    """Send ``task_name`` to ``queue`` when the app itself publishes it (retries, chains).

    Celery 5.5 deprecated the ``queue`` task attribute in favour of ``task_routes``.
    """
    routes = app.conf.task_routes
    route = {task_name: {"queue": queue}}
    if routes is None or isinstance(routes, dict):
        app.conf.task_routes = {**(routes or {}), **route}
    else:
        app.conf.task_routes = [*routes, route]


def register_implementation(
    stub: RemoteTask[Any, Any],
    fn: Callable[..., Any],
    app: Celery | None,
    task_options: dict[str, Any],
) -> None:
    """Register ``fn`` as the Celery task behind ``stub`` on ``app`` (every app if None)."""
    if task_options.get("bind"):
        raise ContractError(
            f"task {stub.name!r} v{stub.version}: implement() does not support bind=True; "
            "the body receives exactly the contract's arguments"
        )
    problem = check_signature(stub, fn)
    if problem is not None:
        raise SignatureMismatchError(
            f"{fn.__qualname__} cannot implement task {stub.name!r} v{stub.version}: {problem}"
        )
    binder = stub.binder
    is_async = inspect.iscoroutinefunction(fn)

    def run(*args: Any, **kwargs: Any) -> Any:
        # Validate again on receipt: a foreign sender may not have. ArgumentError fails
        # the task with a clear message before the body runs.
        call = binder.receive(args, kwargs)
        call_args, call_kwargs = binder.call_arguments(call)
        service = _header(SERVICE_HEADER)
        if is_async:
            value = worker_loop.run(_as_service(service, fn(*call_args, **call_kwargs)))
        else:
            token = _caller_service.set(service)
            try:
                value = fn(*call_args, **call_kwargs)
            finally:
                _caller_service.reset(token)
            if terminated_in_thread():
                # revoke(terminate=True) on celerybridge.AsyncioPool cannot stop a
                # thread: Celery recorded it revoked, so its result is not stored.
                raise Ignore()
        return binder.dump_result(value)

    run.__name__ = fn.__name__
    run.__qualname__ = fn.__qualname__
    run.__module__ = fn.__module__
    run.__doc__ = fn.__doc__
    options: dict[str, Any] = {"serializer": SERIALIZER, "base": DeadLetterTask, **task_options}
    if app is None:
        shared_task(name=stub.wire_name, **options)(run)  # type: ignore[no-untyped-call]
    else:
        app.conf.update(_JSON_ONLY)
        _route(app, stub.wire_name, stub.queue)
        app.task(name=stub.wire_name, **options)(run)  # type: ignore[no-untyped-call]
    registry.implementations[stub.wire_name] = fn
