"""The fast path to a Redis broker: native asyncio publishing with redis-py.

Messages are byte-for-byte what kombu's Redis transport writes for the same
``send_task`` call (see ``_protocol``), so unmodified Celery workers consume them.
No thread is involved: a publish is one round trip (``LPUSH``, preceded by the queue's
binding the first time), awaited on the event loop until Redis acknowledges it;
concurrent publishes share round trips, several batches of them at once.

asyncio only: redis-py's async client does not run under trio, where the bridge
uses the kombu path instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from functools import partial

import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from .._constants import (
    BATCH_MAX,
    PUBLISH_RETRIES,
    RECONNECT_INITIAL,
    RECONNECT_MAX,
    REDIS_BATCHES,
    REDIS_CONNECTIONS,
    REDIS_NEAR,
    REDIS_RTT_DRIFT,
)
from .._exceptions import DelegationError, PublishTimeoutError
from .._signing import Signer
from ._errors import translate
from ._protocol import TaskMessage, redis_binding, redis_payload, redis_queue_key
from .base import NativePublisher, OutgoingMessage

logger = logging.getLogger(__name__)

_CLOSED_WHILE_SENDING = (
    "the publisher was closed while sending it; it may or may not have been delivered"
)


def redis_client(url: str, timeout: float, *, command_timeout: bool = True) -> redis.asyncio.Redis:
    """An asyncio client for ``url`` that reconnects after a server restart.

    At most ``REDIS_CONNECTIONS`` connections: further concurrent commands wait for a
    free one (within their caller's timeout) instead of failing. A command that fails
    because the connection broke is retried on a fresh connection up to
    ``PUBLISH_RETRIES`` times with growing pauses (kombu's publish retry policy does
    the same); a command that timed out is never replayed.

    Connecting is bounded by ``timeout``, and so is each command unless
    ``command_timeout`` is false: for a caller that bounds every command itself, since
    redis-py's per-command timeout costs an extra task per write. A command cancelled by
    its caller's deadline closes its connection, as a timed-out one does.
    """
    retry = Retry(
        ExponentialBackoff(cap=RECONNECT_MAX, base=RECONNECT_INITIAL),
        PUBLISH_RETRIES,
        supported_errors=(redis.exceptions.ConnectionError,),
    )
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_CONNECTIONS,
        timeout=None,
        socket_connect_timeout=timeout,
        socket_timeout=timeout if command_timeout else None,
        socket_keepalive=True,
        retry=retry,
    )
    return redis.asyncio.Redis.from_pool(pool)


class RedisPublisher(NativePublisher[tuple[str, bytes]]):
    """Publishes Celery task messages to a Redis broker with ``redis.asyncio``.

    Follows kombu's Redis transport with its default transport options: the message
    JSON (base64 body) is ``LPUSH``\\ ed onto the queue's list, or onto
    ``<queue>\\x06\\x16<step>`` for priorities 3, 6 and 9; the queue's binding is
    added to ``_kombu.binding.<queue>`` once per publisher, as Celery declares it
    once per connection.

    A publish made while nothing else is on the wire goes alone, as one ``LPUSH`` on a
    connection kept for that. Publishes made while others are on the wire are
    pipelined: those made in one iteration of the loop go out together, in order, as one
    batch (at most ``BATCH_MAX``) on a connection of the publisher's, and up to
    ``REDIS_BATCHES`` batches are on the wire at once, so a distant Redis costs round
    trips that overlap, not one after another. A near one (``REDIS_NEAR``) gets one batch
    at a time: it answers within an iteration or two, and bigger batches cost fewer writes.
    Each publish returns once Redis has answered its own ``LPUSH``, its caller resuming
    at the window's pace (``Window.settle``: a few per iteration of the loop). A caller's
    publishes made one after another (each awaited) arrive in that order; concurrent
    callers have no order between them.

    Delivery is at least once, as with kombu: when a connection breaks, the publishes
    Redis had answered are accepted and the others are sent again on a new connection
    (up to ``PUBLISH_RETRIES`` times), so one may arrive twice; one still unanswered
    after that is a :class:`DelegationError` that says it may or may not have been
    delivered. A publish whose caller gave up (its publish timeout) before its batch
    was written is not sent. With a ``signer`` every message carries its signature
    headers (``_signing``).
    """

    def __init__(
        self,
        broker_url: str,
        *,
        timeout: float,
        signer: Signer | None = None,
        reply_to: str | None = None,
    ) -> None:
        super().__init__(signer=signer, reply_to=reply_to)
        self._timeout = timeout
        # Every command is bounded here: a lone LPUSH by its caller's publish timeout,
        # a batch by ``timeout`` (the flusher has no caller to time it out).
        self._client = redis_client(broker_url, timeout, command_timeout=False)
        # The client's per-command pool and retry bookkeeping cost about half again as
        # much as the command itself (110 vs 70 us per LPUSH here): a lone publish talks
        # to its own connection, with the client's retry policy.
        self._lone: AbstractConnection = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        self._declared: set[str] = set()
        self._pending: deque[_Push] = deque()
        self._flushers: set[asyncio.Task[None]] = set()
        self._gathering = False  # a flusher is about to take what is pending
        self._alone = False  # a publish sent on its own is not answered yet
        self._lone_written = False  # ... and was written at least once
        self._fastest = float("inf")  # the fastest recent batch round trip, in seconds
        self._connections: list[AbstractConnection] = []  # the batches', made as needed
        self._spare: list[AbstractConnection] = []  # ... those no batch is using

    _paces_itself = True  # batches' replies are handed out a few per loop iteration

    def _frame(self, message: OutgoingMessage, wire: TaskMessage) -> tuple[str, bytes]:
        return redis_queue_key(message.queue, wire.priority), redis_payload(wire, message.queue)

    def _size(self, framed: tuple[str, bytes]) -> int:
        return len(framed[1])

    async def _send(self, message: OutgoingMessage, framed: tuple[str, bytes]) -> None:
        key, payload = framed
        doing = f"publishing {message.task_name!r} to {message.queue!r}"
        with translate(DelegationError, doing):
            if message.queue in self._declared and self._idle():
                try:
                    await self._send_alone(key, payload)
                except redis.exceptions.ResponseError:
                    raise  # Redis refused the command: not delivered
                except redis.exceptions.RedisError as exc:  # broken, garbled reply...
                    raise self._lost(doing, exc, written=self._lone_written) from exc
                return
            push = _Push(message.queue, key, payload, asyncio.get_running_loop().create_future())
            self._pending.append(push)
            self._start_flusher()
            try:
                # A cancelled caller (publish timeout) cancels ``done``: not sent if its
                # batch was not written yet, else the outcome is unknown, as
                # PublishTimeoutError says.
                await push.done
            except redis.exceptions.ResponseError:
                raise  # Redis refused the command: not delivered
            except redis.exceptions.RedisError as exc:  # broken, garbled reply...
                raise self._lost(doing, exc, written=push.written) from exc

    @staticmethod
    def _lost(doing: str, exc: Exception, *, written: bool) -> DelegationError:
        """The error for a publish whose connection broke (after the retries) or whose
        reply could not be read: one sent at least once may have reached Redis, one never
        written did not."""
        if not written:
            return DelegationError(f"{doing}: {type(exc).__name__}: {exc}")
        return DelegationError(
            f"{doing}: {type(exc).__name__}: {exc}; it may or may not have been delivered"
        )

    def _idle(self) -> bool:
        """Nothing is on the wire: no batch to join, so a pipeline would only cost."""
        return not self._alone and not self._flushers

    def _start_flusher(self) -> None:
        """Have a flusher take what is pending at the next iteration of the loop: a new
        one if none is about to and fewer than ``REDIS_BATCHES`` are busy (one, if Redis is
        near: ``REDIS_NEAR``); otherwise the first to finish its batch takes the next."""
        if self._gathering or len(self._flushers) >= REDIS_BATCHES:
            return
        if self._flushers and self._fastest < REDIS_NEAR:
            return  # near: the busy flusher takes them next, in a bigger batch
        self._gathering = True
        self._flushers.add(asyncio.get_running_loop().create_task(self._flush()))

    async def _send_alone(self, key: str, payload: bytes) -> None:
        # Publishes made meanwhile see this one on the wire and are batched.
        self._alone = True
        self._lone_written = False
        try:
            await self._lone.retry.call_with_retry(
                partial(self._lpush_alone, key, payload), self._lone_lost
            )
        except redis.exceptions.ConnectionError:
            self._declared.clear()  # the server may have restarted without its data
            raise
        finally:
            self._alone = False

    async def _lpush_alone(self, key: str, payload: bytes) -> None:
        await self._lone.send_command("LPUSH", key, payload)
        self._lone_written = True
        await self._lone.read_response()

    def _connection(self) -> AbstractConnection:
        """A connection for a batch: a spare one, else a new one (connected on first use).

        The pool's own bookkeeping (a lock, a condition, a health read per checkout) is
        skipped: there are never more batches than ``REDIS_BATCHES``, and a connection a
        batch gave up on midway was closed by redis-py, so none has a stale reply.
        """
        if self._spare:
            return self._spare.pop()
        connection: AbstractConnection = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        self._connections.append(connection)
        return connection

    def _answered_in(self, seconds: float) -> None:
        """A batch was answered after ``seconds``: how near Redis is (``REDIS_NEAR``)."""
        self._fastest = min(seconds, self._fastest * REDIS_RTT_DRIFT)

    async def _lone_lost(self, error: Exception) -> None:
        await self._lone.disconnect()  # the retry connects again, unless closed meanwhile
        if self._closed:
            raise DelegationError(_CLOSED_WHILE_SENDING) from error

    def _take(self) -> list[_Push]:
        """The next batch: up to ``BATCH_MAX`` pending publishes whose callers still wait."""
        batch: list[_Push] = []
        pending = self._pending
        while pending and len(batch) < BATCH_MAX:
            push = pending.popleft()
            if not push.done.done():  # else its caller gave up before it was sent
                batch.append(push)
        return batch

    async def _flush(self) -> None:
        # Started in the iteration of a publish, it runs in the next one: every publish
        # made meanwhile is in its batch. Then it takes what piled up, until none is left.
        self._gathering = False
        try:
            await self._flush_batches()
        finally:  # now, not in a done callback: the next publish may go alone
            self._flushers.discard(asyncio.current_task())

    async def _flush_batches(self) -> None:
        while batch := self._take():
            try:
                async with asyncio.timeout(self._timeout):
                    await _Batch(self, batch).run()
            except asyncio.CancelledError:  # closed (aclose) with the batch on the wire
                for push in batch:
                    if not push.answered and not push.done.done():
                        push.done.set_exception(DelegationError(_CLOSED_WHILE_SENDING))
                raise
            except Exception as error:  # handed to the publishers still waiting
                exc = error
                unanswered = [push for push in batch if not push.answered]
                if isinstance(error, TimeoutError):
                    exc = PublishTimeoutError(
                        f"Redis did not answer a batch of {len(unanswered)} publishes within "
                        f"{self._timeout:g} s; they may or may not have been delivered"
                    )
                if isinstance(error, redis.exceptions.ConnectionError):
                    self._declared.clear()  # the server may have restarted without its data
                for push in unanswered:
                    self._window.settle(push.done, exc)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        flushers = list(self._flushers)
        for flusher in flushers:
            flusher.cancel()
        await asyncio.gather(*flushers, return_exceptions=True)
        for push in self._pending:
            if not push.done.done():
                push.done.set_exception(DelegationError("the publisher was closed"))
        self._pending.clear()
        for connection in [self._lone, *self._connections]:
            await connection.disconnect()
        await self._client.aclose()


class _Batch:
    """One pipelined batch on a connection of the publisher's: bindings the batch's queues
    still need, then one ``LPUSH`` per publish, in order, in one write.

    Each reply is handed to its publisher as it is read, so when the connection breaks
    midway the publishes answered so far are accepted; the rest are sent again on a new
    connection (the client's retry policy), at least once, as kombu would.
    """

    def __init__(self, publisher: RedisPublisher, pushes: list[_Push]) -> None:
        self._publisher = publisher
        self._pushes = pushes

    async def run(self) -> None:
        connection = self._publisher._connection()
        try:
            await connection.retry.call_with_retry(
                partial(self._attempt, connection), partial(self._lost, connection)
            )
        except BaseException:
            # Replies may be left unread (a garbled one, a timeout): never reuse it as is.
            await connection.disconnect(nowait=True)
            raise
        finally:
            self._publisher._spare.append(connection)

    async def _attempt(self, connection: AbstractConnection) -> None:
        publisher = self._publisher
        pushes = [push for push in self._pushes if not push.answered and not push.done.done()]
        commands: list[tuple[str | bytes, ...]] = []
        owners: list[_Push | None] = []  # the publish each reply answers; None: a binding
        declaring: set[str] = set()
        for push in pushes:
            if push.queue not in publisher._declared and push.queue not in declaring:
                binding, permanent, member = redis_binding(push.queue)
                commands += [("SADD", binding, member), ("SADD", permanent, member)]
                owners += [None, None]
                declaring.add(push.queue)
            commands.append(("LPUSH", push.key, push.payload))
            owners.append(push)
        if not commands:
            return
        for push in pushes:
            push.written = True
        loop = asyncio.get_running_loop()
        sent = loop.time()
        await connection.send_packed_command(connection.pack_commands(commands))
        settle = publisher._window.settle
        for n, owner in enumerate(owners):
            error: BaseException | None = None
            try:
                await connection.read_response()
                if not n:
                    publisher._answered_in(loop.time() - sent)
            except redis.exceptions.ResponseError as exc:  # this command's, not the batch's
                error = exc
            if owner is not None and not owner.answered:
                owner.answered = True
                settle(owner.done, error)
        publisher._declared |= declaring

    async def _lost(self, connection: AbstractConnection, error: Exception) -> None:
        await connection.disconnect()  # the retry connects again


@dataclass(slots=True)
class _Push:
    """One message waiting for its batch, and the future its publisher awaits."""

    queue: str
    key: str
    payload: bytes
    done: asyncio.Future[None]
    written: bool = False
    """Its ``LPUSH`` was handed to a connection at least once: Redis may have it."""
    answered: bool = False
    """Redis answered its ``LPUSH`` (or refused a command of it); ``done`` is resolved
    at the publisher's pace (``Window.settle``)."""
