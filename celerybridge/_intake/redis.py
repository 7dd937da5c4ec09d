"""What the intake needs of a Redis channel: the size limit, and where an entry came from.

Workers built by :func:`~celerybridge.celery_app` on a ``redis://``, ``rediss://`` or
``sentinel://`` broker take messages with the reliable transport
(``celerybridge._redis_transport``), whose channels use :class:`RawEntryGuard`: every
entry taken passes ``envelope.envelope_refusal`` before kombu parses it, and one kombu
cannot make a message of goes, as it came, to ``<queue>.dead`` (before, the worker
exited and the entry was lost).
"""

from __future__ import annotations

from .._constants import DEFAULT_MAX_MESSAGE_BYTES

# The transport options that carry the limit (set by celery_app from the settings).
MAX_BYTES_OPTION = "celerybridge_max_message_bytes"
# The channel attribute naming the queue its last entry was taken from: a message's
# envelope names a routing key of the sender's choosing, the take names the real one.
POPPED_FROM = "celerybridge_popped_from"
# The channel attribute mapping the delivery tags of messages taken more often than
# CELERYBRIDGE_MAX_DELIVERIES allows to (deliveries, limit): the gate dead-letters those.
OVER_LIMIT = "celerybridge_over_limit"


class RawEntryGuard:
    """A mixin for kombu's Redis channels: the limit raw entries are checked against."""

    # kombu's channels copy the transport options they name onto themselves.
    celerybridge_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
