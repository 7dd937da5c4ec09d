"""How a publisher declares a queue it publishes to: as the worker declares it.

RabbitMQ refuses a declaration whose arguments differ from the queue's
(``PRECONDITION_FAILED - inequivalent arg 'x-queue-type'``), so a publisher that
declares every queue as a classic one breaks quorum queues, priority queues and any
queue with a TTL or a dead-letter exchange, and, publishing first, makes the worker
die at start. Both AMQP publishers therefore check first, passively, whether the queue
exists, and publish to it as it is; only a missing queue is declared, with the
arguments the configuration gives:

1. ``CELERYBRIDGE_QUEUES`` (:attr:`BridgeSettings.queues`) when it names the queue;
2. otherwise, when the bridge was given a Celery app (``Bridge(celery=app)``), as that
   app would declare it (its ``task_queues``, ``task_queue_max_priority``,
   ``task_create_missing_queue_type``, ``task_default_queue_type``);
3. otherwise ``CELERYBRIDGE_DEFAULT_QUEUE_TYPE`` (classic unless set).

The exchange and binding are Celery's for ``send_task(queue=q)``: a durable direct
exchange named after the queue, bound with the queue's name as routing key (or the
Celery app's exchange and routing key for a queue it defines). Redis has no queue
arguments: there the settings are accepted and change nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kombu import Exchange, Queue

from ._constants import AMQP_EXCHANGE_TYPE, QUEUE_TYPE_ARGUMENT, QUEUE_TYPE_CLASSIC

if TYPE_CHECKING:
    from celery import Celery

    from ._config import BridgeSettings


@dataclass(frozen=True, slots=True)
class QueueDeclaration:
    """What to declare for a missing queue: the queue, its exchange and their binding."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    """The queue's AMQP arguments (``x-queue-type``, ``x-max-priority``...)."""
    exchange: str = ""
    """The exchange bound to the queue; ``""`` is the queue's own name."""
    exchange_type: str = AMQP_EXCHANGE_TYPE
    routing_key: str = ""
    """The binding's routing key; ``""`` is the queue's own name."""
    durable: bool = True
    auto_delete: bool = False

    @property
    def exchange_name(self) -> str:
        return self.exchange or self.name

    @property
    def binding_key(self) -> str:
        return self.routing_key or self.name

    def kombu_queue(self, cls: type[Queue] = Queue) -> Queue:
        """The declaration as a kombu ``Queue`` (kombu's path), of class ``cls``."""
        return cls(
            self.name,
            Exchange(self.exchange_name, self.exchange_type, durable=self.durable),
            routing_key=self.binding_key,
            durable=self.durable,
            auto_delete=self.auto_delete,
            queue_arguments=dict(self.arguments) or None,
        )


def queue_type_arguments(queue_type: str) -> dict[str, Any]:
    """The arguments of a queue of ``queue_type``: none for a classic queue, as Celery."""
    return {} if queue_type == QUEUE_TYPE_CLASSIC else {QUEUE_TYPE_ARGUMENT: queue_type}


class QueuePlan:
    """Resolves, once per queue name, how a missing queue is declared (see the module).

    Thread-safe: kombu's path resolves in worker threads, the fast path on the loop.
    """

    def __init__(
        self,
        queues: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        default_queue_type: str = QUEUE_TYPE_CLASSIC,
        celery: Celery | None = None,
    ) -> None:
        self._queues = dict(queues or {})
        self._default = queue_type_arguments(default_queue_type)
        self._celery = celery
        self._resolved: dict[str, QueueDeclaration] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: BridgeSettings, celery: Celery | None = None) -> QueuePlan:
        """The plan ``settings`` (``queues``, ``default_queue_type``) and ``celery`` give."""
        return cls(settings.queues, default_queue_type=settings.default_queue_type, celery=celery)

    def declaration(self, queue: str) -> QueueDeclaration:
        """How ``queue`` is declared if it does not exist."""
        found = self._resolved.get(queue)
        if found is None:
            with self._lock:
                found = self._resolved.get(queue)
                if found is None:
                    found = self._resolve(queue)
                    self._resolved[queue] = found
        return found

    def _resolve(self, queue: str) -> QueueDeclaration:
        arguments = self._queues.get(queue)
        if arguments is not None:
            return QueueDeclaration(queue, dict(arguments))
        if self._celery is not None:
            declared = celery_declaration(self._celery, queue)
            if declared is not None:
                return declared
        return QueueDeclaration(queue, dict(self._default))


def celery_declaration(app: Celery, queue: str) -> QueueDeclaration | None:
    """How ``app``'s own client or worker declares ``queue``, or ``None`` if it would not.

    Reads ``app.amqp.queues`` (``task_queues``, or the default queue with
    ``task_default_queue_type``) without adding to it; a queue it does not define is
    created as Celery's ``Queues.new_missing`` creates it (``task_create_missing_queue_type``),
    unless ``task_create_missing_queues`` is off. ``task_queue_max_priority`` applies to
    both, as in ``Queues.__setitem__``.
    """
    queues: Any = app.amqp.queues  # celery-types does not know its attributes
    if queue in queues:
        defined: Queue = queues[queue]
    elif queues.create_missing:
        defined = queues.new_missing(queue)
    else:
        return None
    arguments = dict(defined.queue_arguments or {})
    if queues.max_priority is not None:
        arguments.setdefault("x-max-priority", queues.max_priority)
    exchange = defined.exchange
    exchange_name = exchange.name if exchange is not None and exchange.name else ""
    routing_key = defined.routing_key or ""
    return QueueDeclaration(
        queue,
        arguments,
        # The queue's own name is the default: the same declaration, compared equal.
        exchange="" if exchange_name == queue else exchange_name,
        exchange_type=(exchange.type if exchange is not None else None) or AMQP_EXCHANGE_TYPE,
        routing_key="" if routing_key == queue else routing_key,
        durable=bool(defined.durable),
        auto_delete=bool(defined.auto_delete),
    )
