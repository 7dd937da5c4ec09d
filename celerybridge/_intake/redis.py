"""kombu's Redis transport, with raw entries checked before kombu parses them.

Workers built by :func:`~celerybridge.celery_app` on a ``redis://``, ``rediss://`` or
``sentinel://`` broker select it through Celery's ``broker_transport``; producers,
stock Celery workers and this transport share kombu's list formats unchanged. An entry
kombu cannot make a message of (``envelope.envelope_refusal``) is pushed, as it came,
to ``<queue>.dead`` and the worker goes on; before, it exited and the entry was lost.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

from .._constants import DEAD_LETTER_SUFFIX, DEFAULT_MAX_MESSAGE_BYTES
from .envelope import envelope_refusal, raw_dead_letter

log = logging.getLogger("celerybridge.intake")

# The transport options that carry the limit (set by celery_app from the settings).
MAX_BYTES_OPTION = "celerybridge_max_message_bytes"
# The channel attribute naming the queue its last entry was popped from: a message's
# envelope names a routing key of the sender's choosing, the pop names the real one.
POPPED_FROM = "celerybridge_popped_from"


class _RawEntryGuard:
    """A mixin for kombu's Redis channels: looks at what BRPOP returns before kombu does."""

    sep: str
    client: Any
    # kombu's channels copy the transport options they name here onto themselves.
    celerybridge_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def _brpop_read(self, **options: Any) -> Any:
        client = self.client
        parse = client.parse_response

        def checked(connection: Any, command: str, **kwargs: Any) -> Any:
            reply = parse(connection, command, **kwargs)
            if reply and command == "BRPOP":
                dest, item = reply
                queue = dest.decode() if isinstance(dest, bytes) else str(dest)
                queue = queue.rsplit(self.sep, 1)[0]
                if self._refuse_raw(queue, item):
                    return None  # kombu reads "nothing popped" and polls again
                setattr(self, POPPED_FROM, queue)  # delivered at once, on this thread
            return reply

        client.parse_response = checked
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        finally:
            del client.parse_response  # back to the class's method

    def _refuse_raw(self, queue: str, item: bytes | str) -> bool:
        reason = envelope_refusal(item, int(self.celerybridge_max_message_bytes))
        if reason is None:
            return False
        dead = f"{queue}{DEAD_LETTER_SUFFIX}"
        self._put(dead, raw_dead_letter(item, queue, reason))  # type: ignore[attr-defined]
        log.error("a raw entry of %d bytes on %s moved to %s: %s", len(item), queue, dead, reason)
        return True


class Channel(_RawEntryGuard, kombu_redis.Channel):
    """kombu's Redis channel with raw entries checked."""

    from_transport_options = (*kombu_redis.Channel.from_transport_options, MAX_BYTES_OPTION)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport (``redis://``, ``rediss://``) with raw entries checked."""

    Channel = Channel


class SentinelChannel(_RawEntryGuard, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with raw entries checked."""

    from_transport_options = (
        *kombu_redis.SentinelChannel.from_transport_options,
        MAX_BYTES_OPTION,
    )


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport (``sentinel://``) with raw entries checked."""

    Channel = SentinelChannel
