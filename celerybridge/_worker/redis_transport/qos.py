"""The QoS of the reliable Redis transport: acknowledging, putting back, the sweep.

The take script (``scripts.py``) records what it takes, so appending a message writes
nothing more. Putting back never drops a record: one kombu cannot restore is
dead-lettered as it came (``records.py``). The visibility sweep and a requeue count one
more delivery in the message's properties (:data:`DELIVERIES_PROPERTY`); a clean close
does not (what it puts back was prefetched, not run), nor does the intake putting back a
message it could not check (the replay record was down: the message is not at fault).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from ..._constants import DELIVERIES_PROPERTY, OVER_LIMIT, UNCOUNTED, UNRESTORABLE_QUEUE
from .records import Found, Unrestorable, dead_letter, key_for, read_record, split_record

log = logging.getLogger("celerybridge.redis")


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS for messages the take script recorded already."""

    channel: Any
    _delivered: Any
    _vrestore_count: int
    _remove_from_indices: Any

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.celerybridge_recorded(delivery_tag):
            virtual.QoS.append(self, message, delivery_tag)
        else:  # delivered some other way (a fanout queue): recorded as kombu does
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        self._forget(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Reject; a requeue is one more delivery unless the intake put the message back
        without checking it (:data:`UNCOUNTED`)."""
        if requeue:
            getattr(self.channel, OVER_LIMIT).pop(delivery_tag, None)
            uncounted = getattr(self.channel, UNCOUNTED)
            count = delivery_tag not in uncounted
            uncounted.discard(delivery_tag)
            self._put_back(delivery_tag, leftmost=True, count=count)
        else:
            self._forget(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        self._put_back(tag, client, leftmost=leftmost)

    def restore_unacked(self, client: Any = None) -> None:
        """Put back what this channel holds as it closes, except, when the channel's
        connection was lost, the messages of tasks still running (they are acknowledged
        through the saved pool as they end, their records refreshed meanwhile). Every
        message held is recorded in Redis already: when putting back fails (the broker
        went away), the records stay for the visibility sweep."""
        kept = self.channel.celerybridge_running_tags() if self.channel.celerybridge_lost else set()
        try:
            with self.channel.conn_or_acquire(client) as client:
                for tag in [t for t in list(self._delivered) if t not in kept]:
                    self.restore_by_tag(tag, client=client)
                    self._delivered.pop(tag, None)
        except Exception as exc:
            log.warning(
                "could not put back %d unacknowledged messages as the channel closed (%s: %s); "
                "they come back after the visibility timeout",
                len(self._delivered) - len(kept),
                type(exc).__name__,
                exc,
            )
            for tag in [t for t in list(self._delivered) if t not in kept]:
                self._delivered.pop(tag, None)

    def _forget(self, delivery_tag: str) -> None:
        """Drop the record of a message acknowledged or rejected. A task that ends after
        its channel closed (the broker went away meanwhile) is acknowledged through the
        closed channel's pool; if Redis cannot be reached, the record stays and the
        message is delivered again after the visibility timeout (kombu's QoS raised, and
        the worker exited)."""
        channel = self.channel
        getattr(channel, OVER_LIMIT).pop(delivery_tag, None)
        getattr(channel, UNCOUNTED).discard(delivery_tag)
        try:
            with channel.celerybridge_client().pipeline() as pipe:
                self._remove_from_indices(delivery_tag, pipe)
                pipe.execute()
        except channel.celerybridge_errors as exc:
            log.warning(
                "could not acknowledge message %s (%s: %s); it is delivered again after the "
                "visibility timeout",
                delivery_tag,
                type(exc).__name__,
                exc,
            )

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """kombu's periodic sweep. Every call also turns what the take script set apart on
        the consumed queues' holding lists into dead letters (a worker that died before
        doing so left them there)."""
        self.channel.celerybridge_drain_held()
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        with self.channel.conn_or_acquire() as client:
            ceil = time.time() - self.visibility_timeout
            try:
                with kombu_redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    visible = client.zrange(
                        self.unacked_index_key, ceil, 0, desc=True, byscore=True,
                        offset=num and start, num=num, withscores=True,
                    )  # fmt: skip
                    for tag, _ in visible or []:
                        self._restore_if_stale(tag, ceil, client)
            except kombu_redis.MutexHeld:
                pass

    def _restore_if_stale(self, tag: Any, ceil: float, client: Any) -> None:
        """Restore ``tag`` unless its worker refreshed it since the sweep looked (the
        score is read again inside the transaction that restores); one more delivery."""
        self._put_back(tag, client, ceil=ceil, count=True)

    def _put_back(
        self,
        tag: Any,
        client: Any = None,
        *,
        leftmost: bool = False,
        count: bool = False,
        ceil: float | None = None,
    ) -> None:
        """Move a record back to its queue in one transaction (kombu's ``restore_by_tag``),
        only if its score is still at most ``ceil`` when given; ``count``: one more
        delivery in the message's properties. A record kombu cannot put back (it logged
        and dropped those) is dead-lettered as it came instead."""
        channel = self.channel

        def restore(pipe: Any) -> None:
            score = None
            if ceil is not None:
                score = pipe.zscore(key_for(pipe, "ZSCORE", self.unacked_index_key), tag)
            payload = pipe.hget(self.unacked_key, tag)
            record = read_record(payload) if payload else None
            pipe.multi()
            if score is not None and ceil is not None and score > ceil:
                return
            self._remove_from_indices(tag, pipe)
            if record is not None:
                message, exchange, routing_key = record
                if count:
                    properties = message["properties"]
                    prior = properties.get(DELIVERIES_PROPERTY)
                    prior = prior if isinstance(prior, int) and prior > 0 else 0
                    properties[DELIVERIES_PROPERTY] = prior + 1
                channel.celerybridge_restore_message(message, exchange, routing_key, pipe, leftmost)

        with channel.conn_or_acquire(client) as client:
            try:
                client.transaction(restore, self.unacked_key, self.unacked_index_key)
            except Unrestorable as exc:
                self._dead_letter_record(tag, client, str(exc))

    def _dead_letter_record(self, tag: Any, client: Any, reason: str) -> None:
        """Move the entry a record holds, as it came, to its queue's dead letters, and drop
        the record, in one transaction."""

        def read(pipe: Any) -> Found | None:
            payload = pipe.hget(self.unacked_key, tag)
            if not payload:
                return None
            entry, routing_key = split_record(payload)
            return entry, routing_key or UNRESTORABLE_QUEUE, reason

        def drop(pipe: Any) -> None:
            self._remove_from_indices(tag, pipe)

        dead_letter(client, read, drop, self.unacked_key)
