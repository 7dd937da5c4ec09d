"""Push-based result awaiting on Celery's ``rpc://`` result backend, with aio-pika.

One reply queue per bridge, named by the bridge and put in every task message it sends
(``reply_to``), declared before the first of them as Celery's ``RPCBackend`` declares
its own (see ``_replies``), and consumed for as long as the bridge lives: a worker's
reply is pushed to us, never polled for. The queue is deleted when the bridge closes.

asyncio only (aio-pika); under trio, or with another broker than RabbitMQ, the bridge
drains the same queue with kombu instead (``celery_results.KombuRpcResultSource``).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

import aio_pika
import aio_pika.abc
import anyio

from .._exceptions import ResultBackendError
from ._errors import FOREIGN_ERRORS, translate
from ._replies import REPLY_QUEUE_ARGUMENTS, Replies, decode_reply
from .amqp import amqp_url, robust_connection
from .base import ResultSource, TaskOutcome

logger = logging.getLogger(__name__)

_CLOSED = "the result source was closed while the result was awaited"


class RpcResultSource(ResultSource):
    """Consumes the bridge's reply queue on RabbitMQ and hands each final reply to its waiters.

    Replies for tasks nobody waits on yet are kept (``_replies.Replies``): a result may
    arrive before ``wait`` is called, and ``handle.result()`` may be awaited twice. A
    reply is consumed once, so the result of a task another process (or bridge) sent
    never reaches this one: waiting for it times out.
    """

    def __init__(self, broker_url: str, reply_to: str, *, timeout: float) -> None:
        self.reply_to = reply_to
        """The reply queue's name, the ``reply_to`` of every task this bridge sends."""
        self.connection_name = f"celerybridge-results {reply_to}"
        """How RabbitMQ lists this source's connection (``rabbitmqctl list_connections``)."""
        self._url = amqp_url(broker_url)
        self._timeout = timeout
        self._replies = Replies()
        self._waiters: dict[str, set[asyncio.Future[TaskOutcome]]] = {}
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._queue: aio_pika.abc.AbstractRobustQueue | None = None
        self._lock: asyncio.Lock | None = None  # created on the caller's loop
        self._waiting = 0
        self._closed = False

    @property
    def waiting(self) -> int:
        return self._waiting

    async def prepare(self) -> None:
        """Declare the reply queue and consume it, once: before the first task is sent."""
        if self._queue is not None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._closed:
                raise ResultBackendError("the result source is closed")
            if self._queue is None:
                with translate(ResultBackendError, f"consuming the reply queue {self.reply_to}"):
                    await self._connect()

    async def _connect(self) -> None:
        # Ours before it connects: a failed or cancelled connect, and aclose, close it.
        connection = robust_connection(self._url, self.connection_name)
        self._connection = connection
        try:
            await connection.connect(timeout=self._timeout)
            channel = await connection.channel(publisher_confirms=False)
            queue = await channel.declare_queue(
                self.reply_to,
                durable=True,
                auto_delete=True,
                exclusive=False,
                arguments=REPLY_QUEUE_ARGUMENTS,
                timeout=self._timeout,
            )
            # no_ack, as Celery's ResultConsumer: a reply is kept here once received.
            await queue.consume(self._on_reply, no_ack=True, timeout=self._timeout)
        except BaseException:
            self._connection = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout):
                await connection.close()
            raise
        self._queue = queue

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            meta = decode_reply(
                message.body, message.content_type, message.content_encoding, message.headers
            )
        except ResultBackendError as exc:  # not ours to fail on: someone else's message
            logger.warning("ignored a message on %s: %s", self.reply_to, exc)
            return
        if meta is None:
            return
        added = self._replies.add(message.correlation_id, meta)
        if added is None:
            return
        task_id, outcome = added
        for future in self._waiters.pop(task_id, ()):
            if not future.done():
                future.set_result(outcome)

    def expect(self, task_id: str) -> None:
        self._replies.expect(task_id)

    async def poll(self, task_id: str) -> TaskOutcome | None:
        await self.prepare()
        self._replies.expect(task_id)
        return self._replies.get(task_id)

    async def wait(self, task_id: str) -> TaskOutcome:
        await self.prepare()
        self._replies.expect(task_id)
        outcome = self._replies.get(task_id)
        if outcome is not None:
            return outcome
        future: asyncio.Future[TaskOutcome] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, set()).add(future)
        self._waiting += 1
        try:
            return await future
        finally:
            self._waiting -= 1
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiters[task_id]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(ResultBackendError(_CLOSED))
        self._waiters.clear()
        if self._lock is not None:
            async with self._lock:  # a connect under way ends first
                pass
        connection, queue = self._connection, self._queue
        self._connection = self._queue = None
        if connection is None:
            return
        # auto_delete would drop the queue once its consumer is gone; deleting it says
        # so at once, and also when the broker has not yet noticed the consumer left.
        if queue is not None and not connection.is_closed:
            with suppress(*FOREIGN_ERRORS, asyncio.TimeoutError):
                await queue.delete(if_unused=False, if_empty=False, timeout=self._timeout)
        await connection.close()
