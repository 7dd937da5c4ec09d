"""Canvas: contract signatures (``stub.s()``, ``.si()``), checked, and workflows published
through the bridge.

A contract signature is a plain Celery ``Signature`` (the worker knows nothing else) whose
arguments were validated when it was built. ``.s()`` may leave the first positional
parameter open, for the previous step of a chain (or a chord's header, or the task a
callback is linked to) to fill; when a workflow is published every contract step is
checked again with what will come before it (:func:`check_workflow`).

:func:`capture` runs Celery's own canvas code (``chain``, ``group``, ``chord``
``apply_async``) on an app that records the messages Celery would send instead of
sending them: Celery decides the task ids, the ``chain`` / ``callbacks`` / ``chord``
embeds and the chord's bookkeeping in the result backend, and the bridge publishes the
recorded messages itself (the fast path where it applies), each signed as a whole.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from celery import Celery
from celery.app.registry import TaskRegistry
from celery.canvas import Signature
from celery.result import AsyncResult, GroupResult
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from ._constants import DEFAULT_QUEUE, SERIALIZER
from ._exceptions import (
    ArgumentError,
    CallError,
    CeleryBridgeError,
    ConfigurationError,
    DelegationError,
)
from ._options import SUPPORTED_OPTIONS, SendOptions, merge_options
from ._registry import registry
from ._transports._errors import is_foreign
from ._transports._protocol import check_body_depth, encoded_body
from ._transports.base import OutgoingMessage
from ._utils import as_list, uuid4_str

if TYPE_CHECKING:
    from ._contracts import RemoteTask

R = TypeVar("R")

# What Celery's canvas passes to send_task besides the user's options, and what the
# message carries for it (send_task's keyword names, which the publishers read).
_CANVAS_OPTIONS: Final = frozenset(
    {"chain", "chord", "group_id", "group_index", "root_id", "parent_id"}
)
# What Celery adds for its own bookkeeping; the bridge's publisher decides these. The
# routing and publish options are those ``Task.apply_async`` adds for Celery's own tasks
# (a chord's ``celery.chord_unlock``, sent by a database or other non-Redis backend):
# the user's own options were refused before recording (:func:`check_embedded_options`).
_IGNORED_OPTIONS: Final = frozenset(
    {"producer", "publisher", "add_to_parent", "reply_to", "serializer", "connection", "router",
     "result_cls", "route_name", "task_type",
     "exchange", "exchange_type", "routing_key", "delivery_mode", "compression", "immediate",
     "mandatory", "ignore_result", "shadow"}
)  # fmt: skip

# What Celery's canvas code puts in a signature's options itself (``freeze``): the rest
# of an embedded signature's options are the user's, checked as top-level ones are.
_FROZEN_OPTIONS: Final = _CANVAS_OPTIONS | {"task_id", "reply_to"}

FIRST = "as the first step, nothing comes before it"
IN_CHAIN = "in a chain, the previous step's result comes first"
CHORD_BODY = "as a chord's body, the list of the header's results comes first"
CALLBACK = "as a link callback, the result of the task it follows comes first"


# -- Building contract signatures -----------------------------------------------------


def contract_signature(
    stub: RemoteTask[Any, R],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    options: Mapping[str, Any],
    *,
    immutable: bool,
) -> Signature[R]:
    """A Celery signature of ``stub`` with validated arguments (JSON, as sent).

    Immutable: the complete call. Otherwise the complete call if the arguments make one,
    else a call whose first positional parameter something before it will fill.
    """
    send = merge_options(stub.name, stub.options, options) if options else stub.options
    if immutable:
        call = stub.binder.bind(args, kwargs)
    else:
        try:
            call = stub.binder.bind_given(args, kwargs, open_first=False)
        except ArgumentError as exc:
            first = stub.binder.positional[:1]
            if not exc.problem.startswith("missing a required argument") or (
                first and first[0] in kwargs
            ):
                raise
            call = stub.binder.bind_given(args, kwargs, open_first=True)
    return Signature(
        stub.wire_name,
        args=tuple(call.args),
        kwargs=dict(call.kwargs),
        options=signature_options(send),
        immutable=immutable,
    )


def signature_options(options: SendOptions) -> dict[str, Any]:
    """Send options as a signature keeps them: what the worker's Celery will send with."""
    kept = options.celery_options()
    kept["queue"] = options.queue
    if options.task_id is not None:
        kept["task_id"] = options.task_id
    return kept


def check_callback(what: str, sig: Signature[Any]) -> Signature[Any]:
    """A ``link`` (the parent's result comes first) or ``link_error`` signature, checked
    and copied as JSON carries it."""
    plain = as_json_signature(sig)
    if what == "link":
        check_workflow(plain, prepended=1, where=CALLBACK)
    else:
        _walk_names(plain)
    check_embedded_options(plain)
    return plain


def as_json_signature(sig: Signature[Any]) -> Signature[Any]:
    """``sig`` after the JSON round trip a message gives it: a fresh signature (the
    caller's is never changed, Celery freezes in place), or a :class:`CallError`."""
    try:
        document = kombu_loads(kombu_dumps(sig))
    except (TypeError, ValueError, RecursionError) as exc:
        raise CallError(f"the workflow cannot be sent as JSON: {exc}") from None
    if not isinstance(document, dict):
        raise CallError("a workflow must be a Celery signature")
    return Signature.from_dict(document)


# -- Checking a workflow --------------------------------------------------------------


def check_workflow(sig: Mapping[str, Any], *, prepended: int = 0, where: str = FIRST) -> None:
    """Check every contract step of ``sig`` with the arguments it will be called with:
    ``prepended`` values (0 or 1) come before its own unless it is immutable."""
    kind = sig.get("subtask_type")
    kwargs = sig.get("kwargs") or {}
    options = sig.get("options") or {}
    if kind == "chain":
        for index, step in enumerate(kwargs.get("tasks") or ()):
            first = index == 0
            check_workflow(
                step, prepended=prepended if first else 1, where=where if first else IN_CHAIN
            )
    elif kind == "group":
        for step in kwargs.get("tasks") or ():
            check_workflow(step, prepended=prepended, where=where)
    elif kind == "chord":
        header = kwargs.get("header") or ()
        for step in (
            header.get("kwargs", {}).get("tasks", ()) if isinstance(header, dict) else header
        ):
            check_workflow(step, prepended=prepended, where=where)
        if kwargs.get("body") is not None:
            check_workflow(kwargs["body"], prepended=1, where=CHORD_BODY)
    else:
        _check_step(sig, prepended, where)
    for callback in as_list(options.get("link")):
        check_workflow(callback, prepended=1, where=CALLBACK)
    for errback in as_list(options.get("link_error")):
        _walk_names(errback)


def check_embedded_options(sig: Mapping[str, Any]) -> None:
    """Check the send options of every signature in ``sig`` (a chain's later steps, a
    chord's body, link callbacks and errbacks) as top-level options are checked
    (:func:`~celerybridge._options.merge_options`): the worker's Celery sends them
    with these options, and a custom header may not replace the task's name or id."""
    for node in _nodes(sig):
        options = node.get("options") or {}
        if not isinstance(options, Mapping):
            raise CallError(f"a workflow step's options must be a mapping: {dict(node)!r:.200}")
        task = node.get("task")
        name = task if isinstance(task, str) and task else "a workflow step"
        given = {
            k: v
            for k, v in options.items()
            if k not in _FROZEN_OPTIONS and k not in ("link", "link_error")
        }
        task_id = options.get("task_id")
        if task_id is not None:
            given["task_id"] = task_id
        merge_options(name, SendOptions(queue=DEFAULT_QUEUE), given)


def check_unique_ids(sig: Mapping[str, Any]) -> None:
    """Refuse a workflow two of whose tasks were given one task id: they would share one
    result record, and one result would be lost."""
    seen: set[str] = set()
    for node in _nodes(sig):
        if node.get("subtask_type"):
            continue  # a group's or chain's id is not a task's
        task_id = (node.get("options") or {}).get("task_id")
        if task_id is None:
            continue
        if task_id in seen:
            raise CallError(
                f"task id {task_id!r} is given to more than one step of the workflow; each "
                "step needs its own (their results would share one record)"
            )
        seen.add(task_id)


def _nodes(sig: Any) -> Iterator[Mapping[str, Any]]:
    """``sig`` and every signature inside it: steps, a chord's header and body, callbacks."""
    if not isinstance(sig, Mapping):
        return
    yield sig
    kind = sig.get("subtask_type")
    kwargs = sig.get("kwargs") or {}
    if kind in ("chain", "group") and isinstance(kwargs, Mapping):
        for step in as_list(kwargs.get("tasks")):
            yield from _nodes(step)
    elif kind == "chord" and isinstance(kwargs, Mapping):
        header = kwargs.get("header")
        for step in [header] if isinstance(header, Mapping) else as_list(header):
            yield from _nodes(step)
        yield from _nodes(kwargs.get("body"))
    options = sig.get("options") or {}
    if isinstance(options, Mapping):
        for key in ("link", "link_error"):
            for callback in as_list(options.get(key)):
                yield from _nodes(callback)


def _check_step(sig: Mapping[str, Any], prepended: int, where: str) -> None:
    name = sig.get("task")
    if not isinstance(name, str) or not name:
        raise CallError(f"a workflow step has no task name: {dict(sig)!r:.200}")
    stub = registry.by_wire_name(name)
    if stub is None:  # a plain Celery task: its own worker checks it
        return
    args, kwargs = tuple(sig.get("args") or ()), dict(sig.get("kwargs") or {})
    try:
        if prepended and not sig.get("immutable"):
            stub.binder.bind_given(args, kwargs, open_first=True)
        else:
            stub.binder.bind(args, kwargs)
    except ArgumentError as exc:
        raise ArgumentError(
            exc.task, exc.version, exc.parameter, f"{exc.problem} ({where})"
        ) from None


def _walk_names(sig: Any) -> None:
    if not isinstance(sig, Mapping) or not isinstance(sig.get("task"), str):
        raise CallError(f"a link_error must be a signature, got {type(sig).__name__}")


# -- Recording what Celery's canvas would send ----------------------------------------


@dataclass(frozen=True, slots=True)
class Recorded:
    """One ``send_task`` call Celery's canvas made."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: dict[str, Any]


class _InertResult(AsyncResult):  # type: ignore[type-arg]
    """A result handle that never subscribes (a group's barrier would subscribe its
    members on a Redis backend) and never unsubscribes."""

    def then(self, callback: Any, on_error: Any = None, weak: bool = False) -> Any:
        return None

    def __del__(self) -> None:
        return None


class _CeleryTasksOnly(TaskRegistry):
    """A task registry that keeps Celery's own tasks (``celery.chord_unlock``...) only.

    Every Celery app picks up shared tasks (``@stub.implement()``, ``shared_task``, and
    ``app.task`` shares by default): a signature of a registered task is sent through
    its ``Task.apply_async``, which adds the task's own publish options (exchange,
    routing key, delivery mode...). The recording app sends every step by name.
    """

    def __setitem__(self, name: str, task: Any) -> None:
        if isinstance(name, str) and name.startswith("celery."):
            super().__setitem__(name, task)


class CanvasApp(Celery):
    """A Celery app that runs canvas code and records the messages instead of sending.

    The result backend is the bridge's: a chord's size and header are stored there, as
    Celery's client stores them. Frozen signatures name ``reply_to`` (the bridge's
    ``rpc://`` reply queue, when it has one). It knows no task but Celery's own
    (:class:`_CeleryTasksOnly`).
    """

    registry_cls = "celerybridge._canvas:_CeleryTasksOnly"

    def __init__(self, result_backend: str | None, reply_to: str | None, io_timeout: float) -> None:
        super().__init__("celerybridge-canvas", backend=result_backend, set_as_current=False)
        self.conf.update(
            task_serializer=SERIALIZER,
            result_serializer=SERIALIZER,
            accept_content=[SERIALIZER],
            result_accept_content=[SERIALIZER],
            redis_socket_connect_timeout=io_timeout,
            redis_socket_timeout=io_timeout,
        )
        self._reply_to = reply_to or "celerybridge-canvas"
        self._recording = threading.local()
        # Celery's per-app AsyncResult class (a cached property), as one that never
        # subscribes: instance attributes win over the property.
        self.AsyncResult = self.subclass_with_self(_InertResult)  # type: ignore[misc]

    @property
    def thread_oid(self) -> str:
        return self._reply_to

    def producer_or_acquire(self, producer: Any = None) -> Any:
        return nullcontext(producer)

    def send_task(  # type: ignore[override]
        self, name: str, args: Any = None, kwargs: Any = None, **options: Any
    ) -> AsyncResult[Any]:
        # Celery's own tasks (a chord's ``celery.chord_unlock``, sent by the result
        # backend) come through ``Task.apply_async`` without an id: give them one.
        task_id = options.pop("task_id", None) or uuid4_str()
        record = Recorded(
            name, tuple(args or ()), dict(kwargs or {}), {**options, "task_id": task_id}
        )
        self._recording.sent.append(record)
        return self.AsyncResult(task_id)

    def record(self, workflow: Signature[Any]) -> tuple[Any, list[Recorded]]:
        """Run ``workflow.apply_async()`` here: its result and what it would have sent."""
        self._recording.sent = []
        try:
            try:
                result = workflow.apply_async()
            except NotImplementedError as exc:  # Celery: this backend has no chords
                raise ConfigurationError(
                    f"this workflow needs a result backend that supports chords (redis://, "
                    f"a database); the bridge's result backend does not: "
                    f"{str(exc).strip().splitlines()[0]}"
                ) from None
            except CeleryBridgeError:
                raise
            except Exception as exc:  # the result backend, or Celery's canvas itself
                if is_foreign(exc):
                    raise DelegationError(
                        f"the workflow's bookkeeping could not be stored in the result "
                        f"backend: {type(exc).__name__}: {exc}"
                    ) from exc
                raise CallError(
                    f"Celery's canvas could not lay out the workflow: {type(exc).__name__}: {exc}"
                ) from exc
            return result, list(self._recording.sent)
        finally:
            self._recording.sent = []


def capture(app: CanvasApp, workflow: Signature[Any]) -> tuple[Any, list[OutgoingMessage]]:
    """The messages that publish ``workflow`` (checked), and Celery's result for it."""
    plain = as_json_signature(workflow)
    check_workflow(plain)
    check_embedded_options(plain)
    check_unique_ids(plain)
    bound = Signature.from_dict(dict(plain), app=app)
    result, sent = app.record(bound)
    messages = [_message(record) for record in sent]
    for message in messages:  # a chain's later steps nest in the first one's body
        check_body_depth(message.task_name, encoded_body(message))
    return result, messages


def _message(record: Recorded) -> OutgoingMessage:
    options = dict(record.options)
    task_id = options.pop("task_id", None)
    if not isinstance(task_id, str):
        raise CallError(f"Celery sent {record.name!r} without a task id")  # pragma: no cover
    queue = options.pop("queue", None) or DEFAULT_QUEUE
    canvas = {k: options.pop(k) for k in _CANVAS_OPTIONS & options.keys()}
    for name in _IGNORED_OPTIONS:
        options.pop(name, None)
    unknown = set(options) - set(SUPPORTED_OPTIONS)
    if unknown:
        raise CallError(
            f"task {record.name!r} in the workflow: unsupported option(s) "
            f"{', '.join(sorted(unknown))}; supported: {', '.join(SUPPORTED_OPTIONS)}"
        )
    send = merge_options(record.name, SendOptions(queue=queue), options)
    args, kwargs = record.args, record.kwargs
    stub = registry.by_wire_name(record.name)
    if stub is not None:  # complete now: checked as the worker will check it
        call = stub.bind(args, kwargs, stacklevel=3)
        args, kwargs = tuple(call.args), dict(call.kwargs)
    message_options = {
        **send.celery_options(),
        **{k: v for k, v in canvas.items() if v is not None},
    }
    return OutgoingMessage(
        task_id=task_id,
        task_name=record.name,
        queue=send.queue,
        args=args,
        kwargs=kwargs,
        options=message_options,
    )


# -- Which task gives the final result ------------------------------------------------


def task_names(messages: Sequence[OutgoingMessage]) -> dict[str, str]:
    """Task id to task name, for every step the messages carry, embedded ones too."""
    names: dict[str, str] = {}
    for message in messages:
        names[message.task_id] = message.task_name
        for key in ("link", "link_error", "chain"):
            for sig in as_list(message.options.get(key)):
                _collect(sig, names)
        if message.options.get("chord") is not None:
            _collect(message.options["chord"], names)
    return names


def _collect(sig: Any, names: dict[str, str]) -> None:
    if not isinstance(sig, Mapping):
        return
    options = sig.get("options") or {}
    task_id, task = options.get("task_id"), sig.get("task")
    if isinstance(task_id, str) and isinstance(task, str):
        names[task_id] = task
    kwargs = sig.get("kwargs") or {}
    for key in ("tasks", "header"):
        nested = kwargs.get(key)
        if isinstance(nested, Mapping):
            _collect(nested, names)
        else:
            for step in as_list(nested):
                _collect(step, names)
    _collect(kwargs.get("body"), names)
    for key in ("link", "link_error", "chain"):
        for step in as_list(options.get(key)):
            _collect(step, names)
    _collect(options.get("chord"), names)


def result_ids(result: Any) -> Iterator[str]:
    """Every task id a (group) result stands for."""
    if isinstance(result, GroupResult):
        for child in result.results or ():
            yield from result_ids(child)
    else:
        yield str(result.id)


def untyped_stub(task_name: str) -> RemoteTask[Any, Any]:
    """A stand-in contract for a plain Celery task: its result is the JSON it stored."""
    from ._contracts import RemoteTask

    def plain() -> Any: ...

    return RemoteTask(
        plain,
        name=task_name,
        version=1,
        queue=DEFAULT_QUEUE,
        wire_name=task_name,
        default=False,
        deprecated=False,
    )
