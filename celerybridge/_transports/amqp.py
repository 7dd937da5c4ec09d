"""The fast path to RabbitMQ: native asyncio publishing with aio-pika, publisher confirms on.

Messages are what kombu's py-amqp transport writes for the same ``send_task`` call
(see ``_protocol``): the same body bytes and the same content header, byte for byte,
because the headers table is encoded by py-amqp's own encoder (below). Celery sends a
task for ``queue=<q>`` to the default exchange with routing key ``<q>``; so does this
publisher. Before its first publish to a queue (once per queue and connection) it
checks, passively, that the queue exists, and declares it only if it does not: a queue
declared by a worker (quorum, with priorities, a TTL...) is published to as it is, and
a missing one is declared as the configuration says (``_queues``), so a worker's later
declaration of it agrees.

asyncio only: aio-pika does not run under trio, where the bridge uses the kombu path.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import aio_pika
import aiormq
import aiormq.abc
import aiormq.exceptions
import anyio
from amqp.serialization import dumps as amqp_dumps
from kombu import Queue
from yarl import URL

from .._constants import (
    AMQP_HEADER_FRAME_OVERHEAD,
    AMQP_WINDOW_MESSAGES,
    PUBLISH_RETRIES,
    RECONNECT_INITIAL,
    RECONNECT_MAX,
)
from .._exceptions import DelegationError
from .._queues import QueueDeclaration, QueuePlan
from .._signing import Signer
from ._errors import translate
from ._protocol import TaskMessage
from .base import NativePublisher, OutgoingMessage

logger = logging.getLogger(__name__)

CONNECTION_LOST: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,  # the broker closed the connection, or it broke
    aiormq.exceptions.ChannelInvalidStateError,  # the channel went with the connection
    ConnectionError,  # reset, refused while reconnecting
)
"""Errors after which a publish is sent again on the restored connection."""


class CeleryProperties(aiormq.spec.Basic.Properties):
    """Basic properties whose headers table is encoded as py-amqp encodes it.

    pamqp (under aio-pika) writes integers in the smallest type (``b`` for 0), floats
    as single precision, and table keys sorted; py-amqp, which Celery's own client and
    workers use, writes ``I``/``L`` integers, doubles and keys in insertion order. The
    worker decodes either, but only py-amqp's encoding makes the content header
    identical to kombu's (``tests/test_amqp_wire.py`` compares the raw bytes). Every
    other property has a single encoding.

    ``message_id`` stays unset, as kombu leaves it: aiormq fills in a random one to match
    returned (``mandatory``) messages to their publish, which never happens with
    ``mandatory`` off.
    """

    @property
    def message_id(self) -> None:
        return None

    @message_id.setter
    def message_id(self, value: object) -> None:
        pass  # aiormq's random id: see above

    encoded_headers: bytes = b""
    """The headers table as py-amqp encodes it (set by :func:`properties_for`)."""

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers":
            return self.encoded_headers or bytes(amqp_dumps("F", (value,)))
        return super().encode_property(name, value)


def amqp_url(broker_url: str) -> str:
    """``broker_url`` as aio-pika reads it: kombu's ``pyamqp://`` is plain ``amqp://``.

    kombu (like aiormq) reads the path after the first slash as the virtual host, so
    ``amqp://host//`` is vhost ``/``; a URL without a path is vhost ``/`` in both.
    """
    url = URL(broker_url)
    if url.scheme == "pyamqp":
        url = url.with_scheme("amqp")
    return str(url)


def robust_connection(url: str, name: str) -> aio_pika.RobustConnection:
    """An unconnected aio-pika connection to ``url`` (as :func:`amqp_url` gives it) that
    reconnects after the broker drops it, listed by RabbitMQ as ``name``.

    Not ``connect_robust()``: its owner holds it before it connects, so a failed or
    cancelled connect closes it, and no reconnection loop outlives a cancelled one.
    """
    return aio_pika.RobustConnection(
        URL(url), client_properties={"connection_name": name}, reconnect_interval=RECONNECT_MAX
    )


def properties_for(wire: TaskMessage) -> CeleryProperties:
    """The basic properties kombu's ``Producer.publish`` gives ``wire`` on py-amqp.

    The headers table is encoded here, once: a value AMQP cannot carry raises now
    (``UNBUILDABLE``), before anything is sent.
    """
    props = wire.properties
    properties = CeleryProperties(
        content_type=wire.content_type,
        content_encoding=wire.content_encoding,
        headers=wire.headers,
        delivery_mode=props["delivery_mode"],
        priority=wire.priority,
        correlation_id=props["correlation_id"],
        reply_to=props["reply_to"],
        expiration=props.get("expiration"),
    )
    properties.encoded_headers = bytes(amqp_dumps("F", (wire.headers,)))
    return properties


def _check_fits(
    channel: aiormq.abc.AbstractChannel, properties: CeleryProperties, message: OutgoingMessage
) -> None:
    """Refuse a message whose content header cannot fit in one frame: RabbitMQ would
    close the connection (``FRAME_ERROR``) under every publish sharing it."""
    frame_max = channel.connection.connection_tune.frame_max
    size = len(properties.encoded_headers) + AMQP_HEADER_FRAME_OVERHEAD
    if frame_max and size > frame_max:
        raise DelegationError(
            f"task {message.task_name!r}: its headers take {size:,} bytes, more than the "
            f"{frame_max:,} bytes RabbitMQ allows in one frame; nothing was sent"
        )


async def ensure_queue(
    connection: aiormq.abc.AbstractConnection, declaration: QueueDeclaration
) -> None:
    """Check passively that the queue exists; if it does not, declare it, its exchange and
    their binding as ``declaration`` says.

    RabbitMQ closes a channel on any refusal (a passive declaration of a missing queue
    among them), so each step has a short-lived channel of its own and the publishing
    channel never sees one. If someone else declares the queue between the check and the
    declaration, differently (a worker starting), theirs stands. A refusal that leaves no
    queue to publish to is a :class:`DelegationError` with RabbitMQ's words.
    """
    queue = declaration.name
    if await _queue_exists(connection, queue):
        return
    try:
        async with _ScratchChannel(connection) as channel:
            await channel.exchange_declare(
                exchange=declaration.exchange_name,
                exchange_type=declaration.exchange_type,
                durable=declaration.durable,
                auto_delete=False,
                arguments={},
            )
            await channel.queue_declare(
                queue=queue,
                durable=declaration.durable,
                exclusive=False,
                auto_delete=declaration.auto_delete,
                arguments=dict(declaration.arguments),
            )
            await channel.queue_bind(
                queue=queue,
                exchange=declaration.exchange_name,
                routing_key=declaration.binding_key,
                arguments={},
            )
    except aiormq.exceptions.ChannelClosed as exc:
        if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed) and await _queue_exists(
            connection, queue
        ):
            logger.info("queue %r was declared meanwhile by someone else: %s", queue, exc)
            return
        raise DelegationError(
            f"RabbitMQ refused to declare queue {queue!r} with arguments "
            f"{dict(declaration.arguments)}: {amqp_reason(exc)}"
        ) from exc


async def _queue_exists(connection: aiormq.abc.AbstractConnection, queue: str) -> bool:
    """Whether ``queue`` exists: a passive declaration, on a channel of its own."""
    try:
        async with _ScratchChannel(connection) as channel:
            await channel.queue_declare(queue=queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    except aiormq.exceptions.ChannelClosed as exc:  # locked (exclusive), access refused...
        raise DelegationError(
            f"RabbitMQ refused to check queue {queue!r}: {amqp_reason(exc)}"
        ) from exc
    return True


class _ScratchChannel:
    """A channel for one step, closed after it unless RabbitMQ has closed it already."""

    def __init__(self, connection: aiormq.abc.AbstractConnection) -> None:
        self._connection = connection
        self._channel: aiormq.abc.AbstractChannel | None = None

    async def __aenter__(self) -> aiormq.abc.AbstractChannel:
        try:
            self._channel = await self._connection.channel(publisher_confirms=False)
        except RuntimeError as exc:
            if not self._connection.is_closed:
                raise
            # aiormq's bare RuntimeError for a closed connection: lost, sent again.
            raise aiormq.exceptions.ChannelInvalidStateError(str(exc)) from exc
        return self._channel

    async def __aexit__(self, *exc_info: object) -> None:
        if self._channel is not None and not self._channel.is_closed:
            with anyio.CancelScope(shield=True):
                await self._channel.close()


def amqp_reason(exc: BaseException) -> str:
    """RabbitMQ's words for a refusal, e.g. ``PRECONDITION_FAILED - inequivalent arg ...``."""
    texts = [a for a in exc.args if isinstance(a, str)]
    return texts[0] if texts else str(exc)


class AmqpPublisher(NativePublisher[tuple[bytes, CeleryProperties]]):
    """Publishes Celery task messages to RabbitMQ with aio-pika, one confirm per message.

    One robust connection and one channel in confirm mode per publisher, opened on the
    first publish. ``publish`` returns once RabbitMQ has confirmed the message (``ack``);
    a ``nack`` is a :class:`DelegationError`. Confirms are pipelined: up to
    ``AMQP_WINDOW_MESSAGES`` publishes are on the channel unconfirmed at once, each
    waiting for its own. As on kombu's path, ``mandatory`` is off:
    the queue is declared before the first publish to it, so the message is routable.

    Delivery is at least once, as with kombu's publish retry policy: a publish whose
    connection broke before its confirm arrived is sent again once aio-pika has
    reconnected, up to ``PUBLISH_RETRIES`` times; a confirmed publish is never
    repeated. Waiting for a reconnection costs no retry: the caller's publish timeout
    bounds it. When RabbitMQ closes the channel over one message (over its
    ``max_message_size``...), the others unconfirmed on it are sent again, each alone
    on a fresh channel, so the message RabbitMQ refuses fails alone, with its reason.
    One still unconfirmed after the retries is a :class:`DelegationError` that says it
    may or may not have been delivered. With a ``signer`` every message carries its
    signature headers (``_signing``). ``queues`` says how to declare a queue that does
    not exist yet (``_queues``).
    """

    window_messages = AMQP_WINDOW_MESSAGES

    def __init__(
        self,
        broker_url: str,
        *,
        timeout: float,
        signer: Signer | None = None,
        reply_to: str | None = None,
        queues: QueuePlan | None = None,
    ) -> None:
        super().__init__(signer=signer, reply_to=reply_to)
        self._queues = QueuePlan() if queues is None else queues
        self._url = amqp_url(broker_url)
        self._timeout = timeout
        self.connection_name = f"celerybridge-publisher {self._origin.origin} {uuid.uuid4()}"
        """How RabbitMQ lists this publisher's connection (``rabbitmqctl list_connections``)."""
        self._connection: aio_pika.RobustConnection | None = None
        # Ours, not aio-pika's robust one: a channel RabbitMQ closed is replaced (with a
        # new number) before anything more is written, never written on while reopening.
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()  # one caller connects or opens a channel at a time
        # Publishes between basic_publish and their confirm, and how many have started:
        # whether a publish had the channel to itself when RabbitMQ closed it.
        self._inflight = 0
        self._started = 0
        self._drained = asyncio.Event()  # nothing in flight
        self._drained.set()
        # Publishes to send alone (after RabbitMQ closed a channel under them): while
        # any wait, others wait at ``_gate`` before writing.
        self._solo = asyncio.Lock()
        self._solo_waiting = 0
        self._gate = asyncio.Event()
        self._gate.set()
        # Queues declared on the current underlying channel: a new one after a
        # reconnection declares again, as kombu does once per connection.
        self._declared: set[str] = set()
        self._declaring: dict[str, asyncio.Future[None]] = {}
        self._declared_on: aiormq.abc.AbstractChannel | None = None

    def _queue(self, name: str) -> Queue:
        return self._queues.declaration(name).kombu_queue()

    def _frame(self, message: OutgoingMessage, wire: TaskMessage) -> tuple[bytes, CeleryProperties]:
        return wire.body, properties_for(wire)

    def _size(self, framed: tuple[bytes, CeleryProperties]) -> int:
        body, properties = framed
        return len(body) + len(properties.encoded_headers)

    async def _send(self, message: OutgoingMessage, framed: tuple[bytes, CeleryProperties]) -> None:
        doing = f"publishing {message.task_name!r} to {message.queue!r}"
        with translate(DelegationError, doing):
            sends = 0  # times written on a channel: at most PUBLISH_RETRIES + 1
            alone = False  # to be sent alone: RabbitMQ closed a shared channel under it
            while True:
                try:
                    if alone:
                        self._solo_waiting += 1
                        self._gate.clear()
                        try:
                            async with self._solo:
                                await self._drained.wait()
                                await self._publish(message, framed, doing, alone=True)
                        finally:
                            self._solo_waiting -= 1
                            if not self._solo_waiting:
                                self._gate.set()
                    else:
                        await self._publish(message, framed, doing, alone=False)
                    return
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():  # our caller's (its timeout)
                        raise
                    # Not ours: aiormq cancels the confirms it waits for when the
                    # channel is closed under them (aclose).
                    raise DelegationError(
                        f"{doing}: the connection was closed before RabbitMQ confirmed it; "
                        "it may or may not have been delivered"
                    ) from None
                except _Unsent:
                    continue  # the channel closed before it was written: not a send
                except _Shared as shared:  # RabbitMQ closed the channel over some message
                    sends += 1
                    exc = shared.__cause__
                    if self._closed or sends > PUBLISH_RETRIES:
                        raise DelegationError(
                            f"{doing}: RabbitMQ closed the channel under it before "
                            f"confirming it ({amqp_reason(exc or shared)}); "
                            "it may or may not have been delivered"
                        ) from exc
                    logger.info("%s: %r; sending it again, alone", doing, exc)
                    alone = True
                except CONNECTION_LOST as exc:
                    sends += 1
                    if self._closed or sends > PUBLISH_RETRIES:
                        raise DelegationError(
                            f"{doing}: {type(exc).__name__}: {exc}; "
                            "it may or may not have been delivered"
                        ) from exc
                    logger.info("%s: %r; sending it again once reconnected", doing, exc)

    async def _publish(
        self,
        message: OutgoingMessage,
        framed: tuple[bytes, CeleryProperties],
        doing: str,
        *,
        alone: bool,
    ) -> None:
        """Write the message once on an open channel and wait for its confirm.

        ``_Unsent``: the channel closed before it was written. ``_Shared``: RabbitMQ
        closed the channel while others were in flight too (whose message it refused is
        unknown). A refusal while it had the channel to itself is its own.
        """
        body, properties = framed
        channel = await self._underlay()
        _check_fits(channel, properties, message)
        await self._declare(channel, message.queue)
        if not alone:
            while not self._gate.is_set():  # someone is being sent alone
                await self._gate.wait()
        if channel.is_closed:
            raise _Unsent
        # No await from here to the write: nobody starts between the gate and the count.
        self._inflight += 1
        self._started += 1
        self._drained.clear()
        mine, crowded = self._started, self._inflight > 1
        try:
            await channel.basic_publish(
                body,
                exchange="",  # Celery: the default exchange, routing key = queue
                routing_key=message.queue,
                properties=properties,
                mandatory=False,
            )
        except aiormq.exceptions.ChannelClosed as exc:
            if crowded or self._started != mine:
                raise _Shared from exc
            raise DelegationError(f"{doing}: RabbitMQ refused it: {amqp_reason(exc)}") from exc
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._drained.set()

    async def _underlay(self) -> aiormq.abc.AbstractChannel:
        """An open channel in confirm mode, connecting first if needed.

        Waits out a reconnection (the caller's publish timeout bounds the wait) and
        replaces a channel RabbitMQ closed, before anything more is written on it.
        """
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._lock:
            while True:
                if self._closed:
                    raise DelegationError("the publisher was closed")
                if self._connection is None:
                    await self._connect()
                channel = self._channel
                if channel is not None and not channel.is_closed:
                    return channel
                assert self._connection is not None
                transport = self._connection.transport
                if transport is None or transport.connection.is_closed:
                    await asyncio.sleep(RECONNECT_INITIAL)  # aio-pika is reconnecting
                    continue
                try:
                    self._channel = await transport.connection.channel(publisher_confirms=True)
                except (ConnectionError, RuntimeError) as exc:  # closed meanwhile
                    logger.info("opening a publishing channel: %r; trying again", exc)
                    await asyncio.sleep(RECONNECT_INITIAL)

    async def _connect(self) -> None:
        # Ours before it connects: a failed or cancelled connect, and aclose, close it.
        connection = robust_connection(self._url, self.connection_name)
        self._connection = connection
        try:
            await connection.connect(timeout=self._timeout)
        except BaseException:
            self._connection = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout):
                await connection.close()
            raise

    async def _declare(self, channel: aiormq.abc.AbstractChannel, queue: str) -> None:
        """Declare ``queue`` once per channel; concurrent first publishes share one declaration."""
        if channel is not self._declared_on:
            self._declared, self._declaring, self._declared_on = set(), {}, channel
        if queue in self._declared:
            return
        pending = self._declaring.get(queue)
        if pending is None:
            pending = asyncio.ensure_future(self._declare_now(channel, queue))
            self._declaring[queue] = pending
        # One cancelled caller (its publish timed out) must not cancel it for the others.
        await asyncio.shield(pending)

    async def _declare_now(self, channel: aiormq.abc.AbstractChannel, queue: str) -> None:
        """Make sure ``queue`` exists, declaring it (as ``_queues`` says) only if it does not."""
        try:
            await ensure_queue(channel.connection, self._queues.declaration(queue))
        finally:
            if channel is self._declared_on:
                self._declaring.pop(queue, None)
        if channel is self._declared_on:
            self._declared.add(queue)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        connection, self._connection, self._channel = self._connection, None, None
        self._gate.set()  # a publish waiting to be sent alone would find it closed
        if connection is not None:
            await connection.close()  # fails any declaration still waiting for the broker
        if self._declaring:
            await asyncio.gather(*self._declaring.values(), return_exceptions=True)


class _Unsent(Exception):
    """The channel closed before the message was written: it was not sent."""


class _Shared(Exception):
    """RabbitMQ closed the channel with others in flight: whose message it refused is
    unknown (the cause is RabbitMQ's error)."""
