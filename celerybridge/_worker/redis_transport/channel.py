"""The channel of the reliable Redis transport: wait without taking, take atomically.

kombu's consumer sends ``BRPOP`` on its event loop and, once the reply is read, records
the message as unacknowledged. This channel waits with ``BLMOVE key key RIGHT RIGHT``
instead (the list's last entry moved onto itself: it wakes when the list has one, and
takes nothing), then takes with the ``TAKE`` script (``scripts.py``): up to what QoS may
still hold, popped and recorded in one step. While the last take filled its batch the
channel sends ``TAKE`` itself on the event loop instead of waiting.

``BLMOVE`` watches one list: the first queue's unprioritised list in kombu's cycle (where
kombu's first ``BRPOP`` key is). No loss-free command waits on several lists (``BRPOP``
and ``BLMPOP`` pop), so when the channel has other candidate lists (priorities, other
queues) it waits at most ``SEVERAL_LISTS_WAIT`` (0.1 s) and then takes from all of them:
a message on another list waits up to 0.1 s on an idle worker, and an idle channel
sends about ten ``BLMOVE`` and ten takes a second.

What the take returns passes the intake's raw-entry check
(``_intake/envelope.py``); what kombu could parse but the worker refuses is
dead-lettered and its record removed in one transaction. A message taken more than
``celerybridge_max_deliveries`` times is handed to the intake gate marked
(:data:`OVER_LIMIT`), which dead-letters it. The QoS (acknowledging, putting back, the
sweep) is in ``qos.py``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import NoScriptError

from ..._constants import (
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_MESSAGE_BYTES,
    HOLD_SUFFIX,
    OVER_LIMIT,
    POPPED_FROM,
    SEVERAL_LISTS_WAIT,
    TAKE_BATCH,
    UNCOUNTED,
)
from ..intake.envelope import envelope_limit, envelope_refusal
from .records import Found, Unrestorable, dead_letter, key_for
from .scripts import TAKE_SHA, run_take, take_arguments
from .versions import check_server
from .visibility import VisibilityRefresher

log = logging.getLogger("celerybridge.redis")

_REFUSED = "not a kombu message: outside what Redis's cjson and Python's json read alike"

_BLMOVE = "BLMOVE"
_TAKE = "EVALSHA"


class ChannelClosed(Exception):
    """An acknowledgement came after the channel closed, and it had no pool to use."""


class ReliableChannel:
    """The take path, for kombu's Redis channels (plain and Sentinel)."""

    # kombu's channel attributes this mixin uses.
    client: Any
    connection: Any
    qos: Any
    active_queues: Any
    priority_steps: list[int]
    global_keyprefix: str
    unacked_key: str
    unacked_index_key: str
    visibility_timeout: Any
    brpop_timeout: Any
    ack_emulation: bool
    connection_errors: tuple[type[BaseException], ...]
    _queue_cycle: Any
    _in_poll: Any
    _brpop_sent_at: float | None
    _closing: bool

    # kombu's channels copy the transport options they name onto themselves.
    celerybridge_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    celerybridge_max_deliveries: int = DEFAULT_MAX_DELIVERIES
    celerybridge_refresh_interval: float | None = None
    celerybridge_lost = False
    # kombu sweeps for abandoned messages on every 10th call of its 10-second timer: a
    # killed worker's tasks came back up to 100 s after their visibility timeout. Every
    # call instead (the transport option ``unacked_restore_throttle`` still overrides it).
    unacked_restore_throttle = 1

    _cb_sent: str | None = None
    _cb_more = False
    _cb_candidates: Sequence[tuple[str, str, str]] = ()
    _cb_refresher: VisibilityRefresher | None = None
    _cb_saved_pool: Any = None
    _cb_ack_client: Any = None
    _cb_errors: tuple[type[BaseException], ...] = ()
    _cb_checked = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._cb_recorded: set[str] = set()
        setattr(self, OVER_LIMIT, {})
        setattr(self, UNCOUNTED, set())
        super().__init__(*args, **kwargs)
        self._cb_errors = tuple(self.connection_errors)

    # -- what the take recorded --------------------------------------------------------

    def celerybridge_recorded(self, tag: str) -> bool:
        """Whether the take script recorded ``tag`` (once: QoS asks as it appends)."""
        try:
            self._cb_recorded.remove(tag)
        except KeyError:
            return False
        return True

    def celerybridge_client(self) -> Any:
        """A client for acknowledgements: on the channel's pool, or once the channel is
        closed, on the pool it had (a pool reconnects when used). Made once per pool and
        shared by every thread (redis-py clients are): a client per acknowledgement cost
        a tenth of the worker's CPU per task."""
        if getattr(self, "connection", None) is not None:
            pool = self.pool  # type: ignore[attr-defined]
        elif self._cb_saved_pool is None:
            raise ChannelClosed("the channel is closed and never had a connection pool")
        else:
            pool = self._cb_saved_pool
        client = self._cb_ack_client
        if client is None or client.connection_pool is not pool:
            if pool is self._cb_saved_pool:
                client = self.Client(connection_pool=pool)  # type: ignore[attr-defined]
            else:
                client = self._create_client()  # type: ignore[attr-defined]
            self._cb_ack_client = client
        return client

    @property
    def celerybridge_errors(self) -> tuple[type[BaseException], ...]:
        """What an acknowledgement on a closed channel may raise."""
        return (*self._cb_errors, ChannelClosed)

    def celerybridge_connection_lost(self) -> None:
        """The connection broke (kombu's ``collect``): the close keeps running tasks."""
        self.celerybridge_lost = True

    def celerybridge_running_tags(self) -> set[str]:
        """The delivery tags of this channel's messages whose tasks Celery runs now
        (``celery.worker.state.active_requests``); none outside a Celery worker."""
        state = sys.modules.get("celery.worker.state")
        for _ in range(10):  # the pool's threads may change the set meanwhile
            try:
                requests = list(getattr(state, "active_requests", ()))
                break
            except RuntimeError:
                continue
        else:
            requests = []
        tags = set()
        for request in requests:
            message = getattr(request, "message", None)
            tag = getattr(message, "delivery_tag", None)
            if getattr(message, "channel", None) is self and isinstance(tag, str):
                tags.add(tag)
        return tags

    def celerybridge_restore_message(
        self, payload: Any, exchange: Any, routing_key: Any, pipe: Any, leftmost: bool
    ) -> None:
        """kombu's ``_do_restore_message``, raising :class:`_Unrestorable` where kombu
        logged and dropped the message."""
        try:
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
            for queue in self._lookup(exchange, routing_key):  # type: ignore[attr-defined]
                priority = self._get_message_priority(payload, reverse=False)  # type: ignore[attr-defined]
                push = pipe.lpush if leftmost else pipe.rpush
                push(self._q_for_pri(queue, priority), dumps(payload))  # type: ignore[attr-defined]
        except self.connection_errors:
            raise
        except Exception as exc:
            raise Unrestorable(f"kombu cannot put it back ({type(exc).__name__}: {exc})") from exc

    def _disconnect_pools(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            self._cb_saved_pool = pool
        super()._disconnect_pools()  # type: ignore[misc]

    def _held_tags(self) -> list[str]:
        qos = self.qos
        for _ in range(10):  # another thread may ack meanwhile: copy again
            try:
                return [t for t in list(qos._delivered) if t not in qos._dirty]
            except RuntimeError:
                continue
        return []

    def _start_refresher(self) -> None:
        if self._cb_refresher is not None or not self.ack_emulation:
            return
        interval = self.celerybridge_refresh_interval or self.visibility_timeout / 4
        self._cb_refresher = VisibilityRefresher(
            "celerybridge-visibility",
            max(float(interval), 0.05),
            self._held_tags,
            self.celerybridge_client,
            self.unacked_index_key,
            tuple(self.connection_errors),
        )
        self._cb_refresher.start()

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        """Consume ``queue``, once the server is known to run the take (Redis 6.2 or
        later, with Lua); what a worker that died left on its holding list is
        dead-lettered first."""
        if self.ack_emulation and not self._cb_checked:
            with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
                check_server(client)
            self._cb_checked = True
        self._start_refresher()
        consumer = super().basic_consume(queue, *args, **kwargs)  # type: ignore[misc]
        if self.ack_emulation:
            self._dead_letter_held_of(queue, int(self.celerybridge_max_message_bytes))
        return consumer

    def _held_running(self) -> list[str]:
        running = self.celerybridge_running_tags()
        return [tag for tag in self._held_tags() if tag in running]

    def close(self) -> None:
        """Close; when the connection was lost, the refresher goes on for the tasks still
        running (their messages stay held) until they are acknowledged."""
        refresher = self._cb_refresher
        if refresher is not None and not self.celerybridge_lost:
            self._cb_refresher = None
            refresher.stop()
        super().close()  # type: ignore[misc]
        refresher, self._cb_refresher = self._cb_refresher, None
        if refresher is not None:
            if self._held_running():
                refresher.follow(self._held_running)
            else:
                refresher.stop()

    # -- candidates and the script ------------------------------------------------------

    def _candidates(self, queues: Sequence[str]) -> list[tuple[str, str, str]]:
        """``(list key, holding list key, queue)`` in kombu's ``BRPOP`` order, prefixed."""
        prefix = self.global_keyprefix or ""
        return [
            (
                prefix + self._q_for_pri(queue, pri),  # type: ignore[attr-defined]
                prefix + queue + HOLD_SUFFIX,
                queue,
            )
            for pri in self.priority_steps
            for queue in queues
        ]

    def _take_arguments(self, candidates: Sequence[tuple[str, str, str]], limit: int) -> list[Any]:
        prefix = self.global_keyprefix or ""
        return take_arguments(
            prefix + self.unacked_key,
            prefix + self.unacked_index_key,
            candidates,
            time.time(),
            limit,
            envelope_limit(int(self.celerybridge_max_message_bytes)),
        )

    def _limit(self) -> int:
        estimate = self.qos.can_consume_max_estimate()
        return TAKE_BATCH if estimate is None else max(1, min(int(estimate), TAKE_BATCH))

    # -- the event loop: wait, then take ------------------------------------------------

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self.ack_emulation:
            return super()._brpop_start(timeout)  # type: ignore[misc, no-any-return]
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        self._cb_candidates = candidates = self._candidates(queues)
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()
        if self._cb_more:
            self._cb_sent = _TAKE
            connection.send_command(_TAKE, *self._take_script_arguments(candidates))
            return
        wait = timeout or 0
        if len(candidates) > 1:  # BLMOVE watches one list: look at the others often
            wait = min(wait, SEVERAL_LISTS_WAIT) if wait else SEVERAL_LISTS_WAIT
        watched = candidates[0][0]
        self._cb_sent = _BLMOVE
        connection.send_command(_BLMOVE, watched, watched, "RIGHT", "RIGHT", wait)

    def _take_script_arguments(self, candidates: Sequence[tuple[str, str, str]]) -> list[Any]:
        return [TAKE_SHA, *self._take_arguments(candidates, self._limit())]

    def _brpop_read(self, **options: Any) -> Any:
        if not self.ack_emulation:
            return super()._brpop_read(**options)  # type: ignore[misc]
        sent, self._cb_sent = self._cb_sent, None
        candidates = self._cb_candidates
        client = self.client
        try:
            connection = client.connection
            try:
                try:
                    reply = client.parse_response(connection, sent or _BLMOVE, **options)
                except NoScriptError:  # Redis restarted or flushed its scripts
                    reply, sent = None, _BLMOVE
                if sent == _TAKE:
                    taken = reply
                elif self._closing:
                    raise virtual.Empty()  # waited: nothing was taken
                else:
                    limit = self._limit()
                    taken = run_take(client, self._take_arguments(candidates, limit))
            except self.connection_errors:
                connection.disconnect()
                raise
            if not self._deliver_taken(taken, candidates, client):
                raise virtual.Empty()
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()  # type: ignore[attr-defined]

    def _deliver_taken(
        self, taken: Any, candidates: Sequence[tuple[str, str, str]], client: Any
    ) -> bool:
        """Hand what the script took to kombu; ``False`` when it took nothing."""
        more, held, entries = taken
        self._cb_more = bool(more)
        if held:
            self._dead_letter_held(candidates)
        entries = list(entries)
        if self._closing:  # taken as the channel closes: back to their queues at once
            for _, tag, _, _ in entries:
                self.qos.restore_by_tag(bytes_to_str(tag), client=None)
            return False
        delivered = False
        while entries:
            index, tag, item, count = entries.pop(0)
            queue = candidates[int(index) - 1][2]
            try:
                if self._deliver_one(queue, bytes_to_str(tag), item, int(count)):
                    delivered = True
            except BaseException:
                for _, rest, _, _ in entries:  # not handed over: not held until the sweep
                    self.qos.restore_by_tag(bytes_to_str(rest), client=None)
                raise
        return delivered

    def _deliver_one(self, queue: str, tag: str, item: bytes, count: int) -> bool:
        payload = self._accept(queue, tag, item, count)
        if payload is None:
            return False
        self._queue_cycle.rotate(queue)
        setattr(self, POPPED_FROM, queue)  # delivered at once, on this thread
        self.connection._deliver(payload, queue)
        return True

    def _accept(self, queue: str, tag: str, item: bytes, count: int) -> dict[str, Any] | None:
        """The message an entry the script recorded makes, marked with its delivery count;
        ``None`` when the intake refuses it (then dead-lettered, its record dropped)."""
        refusal = envelope_refusal(item, int(self.celerybridge_max_message_bytes))
        if refusal is not None:
            self._dead_letter_recorded(queue, tag, item, refusal)
            return None
        payload: dict[str, Any] = loads(bytes_to_str(item))
        payload["properties"]["delivery_tag"] = tag  # an alias is acknowledged as such
        limit = int(self.celerybridge_max_deliveries)
        if count > limit:
            getattr(self, OVER_LIMIT)[tag] = (count, limit)
        self._cb_recorded.add(tag)
        return payload

    def _dead_letter_recorded(self, queue: str, tag: str, item: bytes, reason: str) -> None:
        """Move a recorded entry the intake refuses to ``<queue>.dead`` as it came, and
        drop its record, in one transaction."""

        def drop(pipe: Any) -> None:
            pipe.zrem(self.unacked_index_key, tag)
            pipe.hdel(self.unacked_key, tag)

        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            dead_letter(client, lambda pipe: (item, queue, reason), drop)

    def _dead_letter_held(self, candidates: Sequence[tuple[str, str, str]]) -> None:
        """Wrap what the take script moved to the holding lists as raw dead letters
        (``<queue>.dead``), one entry per transaction: never lost, never doubled."""
        max_bytes = int(self.celerybridge_max_message_bytes)
        for queue in dict.fromkeys(queue for _, _, queue in candidates):
            self._dead_letter_held_of(queue, max_bytes)

    def celerybridge_drain_held(self) -> None:
        """Dead-letter what is left on the holding lists of the queues this channel
        consumes (the sweep calls this: a worker may have died before doing so)."""
        max_bytes = int(self.celerybridge_max_message_bytes)
        for queue in list(self.active_queues):
            self._dead_letter_held_of(queue, max_bytes)

    def _dead_letter_held_of(self, queue: str, max_bytes: int) -> None:
        """Move ``queue``'s holding list, oldest first, one entry per transaction."""
        hold = queue + HOLD_SUFFIX

        def read(pipe: Any) -> Found | None:
            item = pipe.lindex(key_for(pipe, "LINDEX", hold), -1)
            if item is None:
                return None
            return item, queue, envelope_refusal(item, max_bytes) or _REFUSED

        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            if not client.llen(hold):  # the usual case: one cheap look (LLEN is prefixed)
                return
            while dead_letter(client, read, lambda pipe: pipe.rpop(hold), hold):
                pass

    # -- basic_get ----------------------------------------------------------------------

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        if not self.ack_emulation:
            return super()._get(queue)  # type: ignore[misc]
        candidates = self._candidates([queue])
        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            try:
                while True:  # until a message, or nothing: refused entries do not count
                    _, held, entries = run_take(client, self._take_arguments(candidates, 1))
                    if held:
                        self._dead_letter_held(candidates)
                    if not (held or entries):
                        raise virtual.Empty()
                    for _, tag, item, count in entries:
                        payload = self._accept(queue, bytes_to_str(tag), item, int(count))
                        if payload is not None:
                            setattr(self, POPPED_FROM, queue)
                            return payload
            finally:
                self._maybe_update_queues_expire(client, queue)  # type: ignore[attr-defined]
