"""Push-based result awaiting on Celery's Redis result backend.

When a worker stores a result, Celery's Redis backend runs ``SET`` and ``PUBLISH``
of the same JSON on the same key, ``celery-task-meta-<id>``, in one transaction.
:class:`RedisResultSource` keeps ONE subscriber connection and multiplexes every
pending ``wait`` over it: a waiter subscribes to its task's channel, and only once
Redis has confirmed the subscription does it ``GET`` the key, so a result stored
before the subscription is still found and one stored after it is pushed. After a
reconnect every channel is subscribed again and, on each confirmation, read again.
No polling loop and no thread: one reader task per source, on the event loop.

asyncio only (redis-py's async client); under trio the bridge uses the kombu path.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio
import redis.asyncio
from redis.asyncio.connection import AbstractConnection

from .._constants import RECONNECT_INITIAL, RECONNECT_MAX
from .._exceptions import ResultBackendError
from ._errors import FOREIGN_ERRORS, translate
from .base import ResultSource, TaskOutcome, outcome_from_meta
from .kombu import key_value_backend
from .redis import redis_client

logger = logging.getLogger(__name__)
T = TypeVar("T")

_CLOSED = "the result source was closed while the result was awaited"


# What a subscribe or unsubscribe may raise on a broken connection. AttributeError:
# redis-py writes in a task of its own (socket_timeout), and the reader's failing read may
# tear the connection down in between ('NoneType' object has no attribute 'writelines').
_SEND_ERRORS: tuple[type[BaseException], ...] = (*FOREIGN_ERRORS, AttributeError)


def _drop_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class _Waiter:
    """One pending ``wait``: woken by the reader when its channel says something."""

    __slots__ = ("published", "recheck", "wake")

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.published: bytes | None = None
        """The latest meta pushed on the channel, not yet looked at."""
        self.recheck = False
        """The subscription was (re)confirmed: the key must be read again."""


class RedisResultSource(ResultSource):
    """Awaits results pushed on the Redis result backend's pub/sub channels.

    Results are decoded as data with Celery's own backend decoder (JSON only), exactly
    like :class:`~celerybridge._transports.kombu.KombuResultSource`.
    """

    def __init__(self, backend_url: str, *, timeout: float) -> None:
        _, self._backend = key_value_backend(backend_url)  # names keys, decodes; never connects
        self._client = redis_client(backend_url, timeout)  # GETs, pooled
        # The subscriber: blocking reads without a timeout; this class reconnects it.
        self._pool = redis.asyncio.ConnectionPool.from_url(
            backend_url, socket_connect_timeout=timeout, socket_keepalive=True
        )
        self._conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one writer, and (re)connects, on the subscriber
        self._channels: dict[bytes, set[_Waiter]] = {}
        self._unsubscribe: set[bytes] = set()
        self._apart_tasks: set[asyncio.Task[Any]] = set()
        self._timeout = timeout
        self._waiting = 0
        self._closed = False

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def channels(self) -> int:
        """How many channels the subscriber is (or is about to be) subscribed to."""
        return len(self._channels)

    async def poll(self, task_id: str) -> TaskOutcome | None:
        return await self._get(task_id)

    async def wait(self, task_id: str) -> TaskOutcome:
        await self._start(task_id)
        channel = self._key(task_id)
        waiter = _Waiter()
        self._waiting += 1
        try:
            await self._join(channel, waiter)
            while True:
                await waiter.wake.wait()
                waiter.wake.clear()
                if self._closed:
                    raise ResultBackendError(_CLOSED)
                published, waiter.published = waiter.published, None
                if published is not None:
                    outcome = self._decode(task_id, published)
                    if outcome is not None:
                        return outcome
                if waiter.recheck:
                    waiter.recheck = False
                    outcome = await self._get(task_id)
                    if outcome is not None:
                        return outcome
        finally:
            self._waiting -= 1
            self._leave(channel, waiter)

    async def _apart(self, call: Awaitable[T]) -> T:
        """Await ``call`` in a task of its own, so that cancelling the caller cancels only it.

        Some of redis-py's connection checks wait with a zero timeout; on Python 3.11 a
        cancellation arriving at that moment is turned into a timeout and lost, and a
        cancelled ``wait`` would go on waiting. In its own task the command completes
        (the connection stays consistent) and its outcome is dropped if nobody waits for
        it; ``aclose`` waits for such commands before closing the connections they use,
        or one would reconnect a closed pool and leave its socket behind.
        """
        task = asyncio.ensure_future(call)
        self._apart_tasks.add(task)
        task.add_done_callback(self._apart_tasks.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_drop_outcome)
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for waiters in self._channels.values():
            for waiter in waiters:
                waiter.wake.set()
        for task in (self._reader, self._flusher):
            # Cancelled until it ends: a cancellation redis-py swallows (see _apart) must
            # not leave close waiting for ever.
            while task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            if task is not None and not task.cancelled():
                task.exception()  # retrieved: the task ended as intended
        if self._apart_tasks:  # commands abandoned by cancelled callers: let them end
            _, late = await asyncio.wait(set(self._apart_tasks), timeout=self._timeout + 1)
            for task in late:
                task.cancel()
        if self._conn is not None:
            await self._conn.disconnect()
        await self._pool.disconnect()
        await self._client.aclose()

    # -- reading keys ------------------------------------------------------------------

    def _key(self, task_id: str) -> bytes:
        # The result key, which is also the channel its meta is published on.
        key: bytes | str = self._backend.get_key_for_task(task_id)
        return key.encode() if isinstance(key, str) else key

    async def _get(self, task_id: str) -> TaskOutcome | None:
        key = self._key(task_id)
        with translate(ResultBackendError, f"reading the result of task {task_id}"):
            raw = await self._apart(self._client.get(key))
        if raw is None:
            return None
        return self._decode(task_id, raw.encode() if isinstance(raw, str) else raw)

    def _decode(self, task_id: str, raw: bytes) -> TaskOutcome | None:
        with translate(ResultBackendError, f"decoding the result of task {task_id}"):
            return outcome_from_meta(self._backend.decode(raw))

    # -- the subscription ----------------------------------------------------------------

    async def _start(self, task_id: str) -> None:
        if self._closed:
            raise ResultBackendError("the result source is closed")
        if self._reader is not None:
            return
        async with self._lock:
            if self._reader is not None:
                return
            # Ours before it connects: a failed or cancelled connect closes it, and
            # otherwise aclose does.
            conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
            self._conn = conn
            try:
                with translate(ResultBackendError, f"subscribing to the result of task {task_id}"):
                    await conn.connect()
            except BaseException:
                self._conn = None
                with anyio.CancelScope(shield=True):
                    await conn.disconnect()
                raise
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _join(self, channel: bytes, waiter: _Waiter) -> None:
        self._unsubscribe.discard(channel)
        waiters = self._channels.get(channel)
        if waiters is not None:
            # Subscribed, or about to be: read the key now and again on confirmation.
            waiters.add(waiter)
            waiter.recheck = True
            waiter.wake.set()
            return
        self._channels[channel] = {waiter}
        await self._send("SUBSCRIBE", channel)

    def _leave(self, channel: bytes, waiter: _Waiter) -> None:
        # Runs in ``finally``, perhaps cancelled: never awaits. A flusher task
        # unsubscribes, in batches, from channels nobody waits on any more.
        waiters = self._channels.get(channel)
        if waiters is None:
            return
        waiters.discard(waiter)
        if waiters or self._closed:
            return
        del self._channels[channel]
        self._unsubscribe.add(channel)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._unsubscribe:
            async with self._lock:
                # A channel someone joined again meanwhile stays subscribed.
                channels = [c for c in self._unsubscribe if c not in self._channels]
                self._unsubscribe.clear()
            if channels:
                await self._send("UNSUBSCRIBE", *channels)

    async def _send(self, *command: str | bytes) -> None:
        async with self._lock:
            conn = self._conn
            if conn is None:
                return
            try:
                await self._apart(conn.send_command(*command, check_health=False))
            except _SEND_ERRORS as exc:
                if isinstance(exc, AttributeError) and conn.is_connected:
                    raise  # not the torn-down connection: a bug to see
                # The reader sees the broken connection too; it reconnects and subscribes
                # again to every channel someone waits on.
                logger.debug("%s failed on the result subscriber: %r", command[0], exc)

    async def _read(self) -> None:
        conn = self._conn
        assert conn is not None
        while not self._closed:
            try:
                # Block without a time limit (math.inf, as redis-py's own PubSub does);
                # pub/sub frames are push replies, returned only when asked for.
                response = await conn.read_response(timeout=math.inf, push_request=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the reader must outlive any failure of its connection
                logger.warning("result subscription lost (%r); reconnecting", exc)
                await self._reconnect(conn)
                continue
            if isinstance(response, list) and len(response) >= 2:
                self._dispatch(response[0], response[1], response[2:])

    def _dispatch(self, kind: object, channel: object, rest: list[object]) -> None:
        waiters = self._channels.get(channel) if isinstance(channel, bytes) else None
        if not waiters:
            return
        if kind == b"message" and rest and isinstance(rest[0], bytes):
            for waiter in waiters:
                waiter.published = rest[0]
                waiter.wake.set()
        elif kind == b"subscribe":
            for waiter in waiters:
                waiter.recheck = True
                waiter.wake.set()

    async def _reconnect(self, conn: AbstractConnection) -> None:
        pause = RECONNECT_INITIAL
        while not self._closed:
            async with self._lock:
                try:
                    await conn.disconnect()
                    await conn.connect()  # type: ignore[no-untyped-call]
                    if self._channels:
                        await conn.send_command("SUBSCRIBE", *self._channels)
                    logger.info("result subscription restored")
                    return
                except FOREIGN_ERRORS as exc:
                    logger.debug("reconnecting the result subscriber failed: %r", exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RECONNECT_MAX)
