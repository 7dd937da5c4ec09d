"""The fast path to a Redis broker: native asyncio publishing with redis-py.

Messages are byte-for-byte what kombu's Redis transport writes for the same
``send_task`` call (see ``_protocol``), so unmodified Celery workers consume them.
No thread is involved: a publish is one round trip (``LPUSH``, preceded by the queue's
binding the first time), awaited on the event loop until Redis acknowledges it;
concurrent publishes share round trips.

asyncio only: redis-py's async client does not run under trio, where the bridge
uses the kombu path instead.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
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
    REDIS_CONNECTIONS,
)
from .._exceptions import DelegationError, PublishTimeoutError
from .._signing import Signer
from ._errors import translate
from ._protocol import TaskMessage, redis_binding, redis_payload, redis_queue_key
from .base import NativePublisher, OutgoingMessage

logger = logging.getLogger(__name__)


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
    once per connection. Delivery is at least once, as with kombu: a publish whose
    connection broke is sent again on a new one.

    A publish made while nothing else is on the wire goes alone, as one ``LPUSH`` on a
    connection kept for that (one more than the pool's). Publishes made while others are
    on the wire are pipelined on the pool's connections: they go out together in the
    next batch, in order, and each returns once Redis has answered its batch. With a
    ``signer`` every message carries its signature headers (``_signing``).
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
        self._pending: list[_Push] = []
        self._flusher: asyncio.Task[None] | None = None
        self._alone = False  # a publish sent on its own is not answered yet

    def _frame(self, message: OutgoingMessage, wire: TaskMessage) -> tuple[str, bytes]:
        return redis_queue_key(message.queue, wire.priority), redis_payload(wire, message.queue)

    async def _send(self, message: OutgoingMessage, framed: tuple[str, bytes]) -> None:
        key, payload = framed
        with translate(DelegationError, f"publishing {message.task_name!r} to {message.queue!r}"):
            if message.queue in self._declared and self._idle():
                await self._send_alone(key, payload)
                return
            loop = asyncio.get_running_loop()
            push = _Push(message.queue, key, payload, done=loop.create_future())
            self._pending.append(push)
            if self._flusher is None or self._flusher.done():
                self._flusher = loop.create_task(self._flush())
            # A cancelled caller (publish timeout) leaves its push in the batch: the
            # outcome is unknown, as PublishTimeoutError says.
            await push.done

    def _idle(self) -> bool:
        """Nothing is on the wire: no batch to join, so a pipeline would only cost."""
        return not self._alone and (self._flusher is None or self._flusher.done())

    async def _send_alone(self, key: str, payload: bytes) -> None:
        # Publishes made meanwhile see this one on the wire and are batched.
        self._alone = True
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
        await self._lone.read_response()

    async def _lone_lost(self, error: Exception) -> None:
        await self._lone.disconnect()  # the retry connects again

    async def _flush(self) -> None:
        # Every publish made while a batch is on the wire goes in the next one: one
        # pipeline (one write, one round trip) for many LPUSHes, in their order.
        while self._pending:
            batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
            try:
                async with asyncio.timeout(self._timeout):
                    await self._execute(batch)
            except Exception as error:  # handed to the publishers of the batch
                exc = error
                if isinstance(error, TimeoutError):
                    exc = PublishTimeoutError(
                        f"Redis did not answer a batch of {len(batch)} publishes within "
                        f"{self._timeout:g} s; they may or may not have been delivered"
                    )
                if isinstance(error, redis.exceptions.ConnectionError):
                    self._declared.clear()  # the server may have restarted without its data
                for push in batch:
                    if not push.done.done():
                        push.done.set_exception(exc)
            else:
                for push in batch:
                    if not push.done.done():
                        push.done.set_result(None)

    async def _execute(self, batch: list[_Push]) -> None:
        declared: set[str] = set()
        async with self._client.pipeline(transaction=False) as pipe:
            for push in batch:
                if push.queue not in self._declared and push.queue not in declared:
                    binding, permanent, member = redis_binding(push.queue)
                    pipe.sadd(binding, member)
                    pipe.sadd(permanent, member)
                    declared.add(push.queue)
                pipe.lpush(push.key, push.payload)
            await pipe.execute()
        self._declared |= declared

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with suppress(asyncio.CancelledError):
                await self._flusher
        for push in self._pending:
            if not push.done.done():
                push.done.set_exception(DelegationError("the publisher was closed"))
        self._pending.clear()
        await self._lone.disconnect()
        await self._client.aclose()


@dataclass(slots=True)
class _Push:
    """One message waiting for its batch, and the future its publisher awaits."""

    queue: str
    key: str
    payload: bytes
    done: asyncio.Future[None]
