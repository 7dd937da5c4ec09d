"""Celery task message protocol v2, written the way Celery and kombu write it.

The native publishers build their messages here instead of going through
``Celery.send_task``. Every field mirrors a line of Celery's ``AMQP.as_task_v2`` and
``send_task_message`` (``celery/app/amqp.py``), ``Celery.send_task``
(``celery/app/base.py``) and kombu's ``Producer.publish`` and virtual
``Channel.prepare_message`` / ``basic_publish`` (``kombu/messaging.py``,
``kombu/transport/virtual/base.py``); ``tests/test_wire.py`` compares the result
field by field with what kombu writes for the same call.

Serialisation goes through kombu's own JSON encoder, so arguments that JSON cannot
carry natively (datetimes, UUIDs, decimals) are encoded exactly as on the kombu path.
"""

from __future__ import annotations

import base64
import os
import uuid
from bisect import bisect
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery.utils.nodenames import anon_nodename
from kombu.utils.json import JSONEncoder
from kombu.utils.json import loads as kombu_loads

from .._constants import (
    CELERY_PERSISTENT_DELIVERY_MODE,
    CONTENT_ENCODING,
    CONTENT_TYPE,
    KOMBU_BINDING_PERMANENT_PREFIX,
    KOMBU_BINDING_PREFIX,
    KOMBU_PRIORITY_STEPS,
    KOMBU_REDIS_SEP,
    MAX_BODY_DEPTH,
    MAX_MESSAGE_TTL,
    MAX_PRIORITY,
)
from .._exceptions import CallError
from .._utils import as_list, uuid4_str
from ._hooks import before_publish
from ._repr import args_repr, kwargs_repr

if TYPE_CHECKING:
    from collections.abc import Callable

    from kombu import Queue

    from .._signing import Signer
    from .base import OutgoingMessage

BODY_ENCODING = "base64"
"""kombu's virtual transports (Redis among them) base64 the serialised body."""

_KOMBU_JSON = JSONEncoder()
"""What kombu's ``json`` serializer (``kombu.utils.json.dumps``) encodes with: its
encoder class with ``json.dumps``' defaults. Built once; ``dumps`` builds one per call."""


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """A task message in protocol v2 parts, before any transport frames it."""

    headers: dict[str, Any]
    properties: dict[str, Any]
    """``correlation_id``, ``reply_to``, ``delivery_mode``, and ``expiration`` if any."""
    body: bytes
    """``[args, kwargs, embed]`` as kombu's JSON, UTF-8."""
    content_type: str
    content_encoding: str
    priority: int
    """The AMQP priority property: kombu's ``Producer.publish`` default is 0."""
    payload: tuple[Any, Any, Any]
    """``(args, kwargs, embed)``: the body before encoding, as publish signals see it."""
    routing_key: str
    """The queue: Celery sends to the default exchange (``""``) with this routing key."""


class Origin:
    """Who sends: the ``origin`` header and the ``reply_to`` property of one publisher.

    Celery sets ``origin`` to ``gen<pid>@<host>`` and ``reply_to`` to a per-app,
    per-thread oid (only the ``rpc://`` backend reads it); one publisher has one of each.
    ``reply_to`` names the bridge's reply queue when its result backend is ``rpc://``.
    """

    def __init__(self, reply_to: str | None = None) -> None:
        self.pid = os.getpid()
        self.origin = anon_nodename()
        self.reply_to = reply_to or str(uuid.uuid4())


def task_message(
    message: OutgoingMessage,
    origin: Origin,
    now: datetime | None = None,
    signer: Signer | None = None,
    declare: Callable[[str], Queue] | None = None,
) -> TaskMessage:
    """The protocol v2 message Celery's ``send_task`` builds for ``message``.

    ``before_task_publish`` is sent on the way, as ``send_task`` sends it: its receivers
    (OpenTelemetry's Celery instrumentation, for one) see the headers, the properties,
    the unencoded body and the queue as ``declare`` gives it, and what they change
    there is what is sent. With a
    ``signer`` the signature headers come last, over the final headers and body bytes,
    as the kombu path adds them (``_signing.SigningAMQP``); without one nothing differs
    from Celery's.
    """
    options = message.options
    args, kwargs = message.args, message.kwargs
    eta_iso, expires_iso, ttl = _timing(options, now)
    task_id = message.task_id
    headers: dict[str, Any] = {
        "lang": "py",
        "task": message.task_name,
        "id": task_id,
        "shadow": None,
        "eta": eta_iso,
        "expires": expires_iso,
        "group": options.get("group_id"),
        "group_index": options.get("group_index"),
        "retries": 0,
        "timelimit": [options.get("time_limit"), options.get("soft_time_limit")],
        "root_id": options.get("root_id") or task_id,
        "parent_id": options.get("parent_id"),
        "argsrepr": args_repr(args),
        "kwargsrepr": kwargs_repr(kwargs),
        "origin": origin.origin,
        # send_task pops ignore_result from its options: None unless a caller set it.
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    headers.update(options.get("headers") or {})  # send_task merges custom headers in last
    # The properties as send_task hands them to the signal: the message's own, then its
    # publish options (expiration in seconds; kombu turns it into milliseconds).
    properties: dict[str, Any] = {"correlation_id": task_id, "reply_to": origin.reply_to}
    if options.get("priority") is not None:
        properties["priority"] = options["priority"]
    if ttl is not None:
        # send_task passes expires as the broker TTL too (Producer.publish's expiration).
        properties["expiration"] = ttl
    embed = {
        "callbacks": _listed(options.get("link")),
        "errbacks": _listed(options.get("link_error")),
        "chain": options.get("chain"),
        "chord": options.get("chord"),
    }
    payload = (args, kwargs, embed)
    before_publish(message.queue, message.task_name, payload, headers, properties, declare)
    body = _KOMBU_JSON.encode(payload).encode(CONTENT_ENCODING)
    check_body_depth(message.task_name, body)
    if signer is not None:  # the final message: every header merged, the body's bytes
        headers.update(
            signer.headers(
                headers,
                body,
                content_type=CONTENT_TYPE,
                content_encoding=CONTENT_ENCODING,
            )
        )
    framed: dict[str, Any] = {
        "correlation_id": _text(properties, "correlation_id"),
        "reply_to": _text(properties, "reply_to"),
        "delivery_mode": CELERY_PERSISTENT_DELIVERY_MODE,
    }
    expiration = _number(properties, "expiration", MAX_MESSAGE_TTL)
    if expiration is not None:
        framed["expiration"] = str(int(expiration * 1000))
    priority = _number(properties, "priority", MAX_PRIORITY)
    return TaskMessage(
        headers=headers,
        properties=framed,
        body=body,
        content_type=CONTENT_TYPE,
        content_encoding=CONTENT_ENCODING,
        priority=int(priority or 0),
        payload=payload,
        routing_key=message.queue,
    )


def encoded_body(message: OutgoingMessage) -> bytes:
    """The body ``[args, kwargs, embed]`` of ``message`` as :func:`task_message` encodes
    it (without what ``before_task_publish`` receivers may change)."""
    embed = {
        "callbacks": _listed(message.options.get("link")),
        "errbacks": _listed(message.options.get("link_error")),
        "chain": message.options.get("chain"),
        "chord": message.options.get("chord"),
    }
    payload = (message.args, message.kwargs, embed)
    return _KOMBU_JSON.encode(payload).encode(CONTENT_ENCODING)


def check_body_depth(task_name: str, body: bytes) -> None:
    """Refuse (:class:`CallError`) a body nested deeper than the worker's intake reads
    (``MAX_BODY_DEPTH``, as it decodes it): sent, it would only be dead-lettered."""
    from .._worker.intake.shape import depth_exceeds

    try:
        deep = depth_exceeds(kombu_loads(body), MAX_BODY_DEPTH)
    except RecursionError:
        deep = True
    if deep:
        raise CallError(
            f"task {task_name!r} cannot be sent: its message body would nest deeper than "
            f"{MAX_BODY_DEPTH} levels, which the worker refuses (arguments, and the "
            "workflow steps and callbacks the message carries, nest in it)"
        )


def _timing(
    options: dict[str, Any], now: datetime | None
) -> tuple[str | None, str | None, float | None]:
    """The ``eta`` and ``expires`` headers and the broker TTL, as ``as_task_v2`` and
    ``send_task`` compute them: a countdown wins over an ``eta``; ``expires`` in seconds
    or as a datetime; a TTL already past is 0, one beyond RabbitMQ's reach its limit."""
    countdown: float | None = options.get("countdown")
    eta: datetime | str | None = options.get("eta")
    expires: float | datetime | str | None = options.get("expires")
    if not (countdown or eta is not None or expires is not None):
        return None, None, None
    now = now or datetime.now(UTC)
    eta_iso = expires_iso = None
    ttl: float | None = None
    if countdown:  # Celery: "if countdown: convert countdown to ETA"
        eta_iso = (now + timedelta(seconds=countdown)).isoformat()
    elif isinstance(eta, datetime):
        eta_iso = eta.isoformat()
    elif eta is not None:
        eta_iso = str(eta)
    if isinstance(expires, str):
        expires = datetime.fromisoformat(expires)
    if isinstance(expires, datetime):
        expires_iso = expires.isoformat()
        ttl = (expires - now).total_seconds()
    elif expires is not None:
        expires_iso = (now + timedelta(seconds=expires)).isoformat()
        ttl = expires
    if ttl is not None:
        ttl = min(max(ttl, 0), MAX_MESSAGE_TTL)
    return eta_iso, expires_iso, ttl


def _listed(value: Any) -> list[Any] | None:
    """A ``link`` option as the embed carries it (Celery's ``maybe_list``)."""
    return None if value is None else as_list(value)


def _text(properties: dict[str, Any], name: str) -> str | None:
    value = properties.get(name)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"the {name} property must be a string, not {type(value).__name__}")
    return value


def _number(properties: dict[str, Any], name: str, largest: float) -> float | None:
    """A numeric property as a receiver may have left it: a number from 0 to ``largest``."""
    value = properties.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= largest:
        raise ValueError(
            f"the {name} property must be a number from 0 to {largest:g}, not {value!r}"
        )
    return value


def redis_payload(message: TaskMessage, queue: str) -> bytes:
    """The JSON document kombu's Redis transport LPUSHes for ``message``.

    Mirrors ``Channel.prepare_message`` and ``_inplace_augment_message``: the body is
    base64'd, and ``delivery_info`` names the anonymous exchange (Celery publishes to a
    direct queue with ``exchange=''``, ``routing_key=<queue>``).
    """
    properties = dict(message.properties)
    properties["delivery_info"] = {"exchange": "", "routing_key": queue}
    properties["priority"] = message.priority
    properties["body_encoding"] = BODY_ENCODING
    properties["delivery_tag"] = uuid4_str()
    document = {
        "body": base64.b64encode(message.body).decode("ascii"),
        "content-encoding": message.content_encoding,
        "content-type": message.content_type,
        "headers": message.headers,
        "properties": properties,
    }
    return _KOMBU_JSON.encode(document).encode(CONTENT_ENCODING)


def redis_queue_key(queue: str, priority: int) -> str:
    """The list a message of ``priority`` goes to (kombu ``Channel._q_for_pri``).

    kombu clamps the priority to 0..9 and rounds it down to a step of ``0, 3, 6, 9``;
    step 0 is the plain queue name, others are ``<queue>\\x06\\x16<step>``.
    """
    clamped = max(min(priority, 9), 0)
    step = KOMBU_PRIORITY_STEPS[bisect(KOMBU_PRIORITY_STEPS, clamped) - 1]
    return f"{queue}{KOMBU_REDIS_SEP}{step}" if step else queue


def redis_binding(queue: str) -> tuple[str, str, str]:
    """The binding-table keys and member Celery declares for ``queue`` on Redis.

    Celery creates a missing queue as ``Queue(q, Exchange(q, 'direct'), routing_key=q)``;
    kombu's ``_queue_bind`` adds ``routing_key<sep>pattern<sep>queue`` to
    ``_kombu.binding.<exchange>`` and to ``_kombu.binding_permanent.<exchange>``.
    """
    member = KOMBU_REDIS_SEP.join([queue, "", queue])
    return KOMBU_BINDING_PREFIX + queue, KOMBU_BINDING_PERMANENT_PREFIX + queue, member
