"""kombu's AMQP transport, with message headers that py-amqp cannot read kept apart.

py-amqp decodes a message's properties before kombu or Celery see the message, and some
that RabbitMQ passes on it cannot read: a header table nested a few thousand levels deep
(an AMQP frame holds ~18,000) raised ``RecursionError``, invalid UTF-8 in a short string
(``content_type``, ``reply_to``...) ``UnicodeDecodeError``, a header timestamp out of range
``OSError``. Each left the worker's consumer: the worker exited (or, for ``OSError``, which
Celery reads as a lost connection, reconnected in a loop), and since the message went back
on the queue every worker met it again. Workers built by
:func:`~celerybridge.celery_app` on ``amqp://`` brokers use this transport (Celery's
``broker_transport``): such a header frame is replaced by one carrying only
:data:`UNREADABLE_HEADER`, so the message (its body intact) reaches the intake gate,
which dead-letters it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from struct import pack, unpack_from
from typing import Any

from amqp.basic_message import Message
from amqp.method_framing import frame_handler
from kombu.transport import pyamqp

from ..._constants import UNREADABLE, UNREADABLE_HEADER

log = logging.getLogger("celerybridge.intake")


_HEADER_FRAME = 2


def _readable_header(buf: Any) -> bytes:
    """A content header frame with the class and body size of ``buf`` and, as its only
    property, :data:`UNREADABLE_HEADER`."""
    class_id, body_size = unpack_from(">HxxQ", buf, 0)
    stand_in: Any = Message(application_headers={UNREADABLE_HEADER: UNREADABLE})
    properties: bytes = stand_in._serialize_properties()
    return pack(">HHQ", class_id, 0, body_size) + properties


def guarded_frame_handler(
    connection: Any, callback: Callable[..., Any], **kwargs: Any
) -> Callable[[tuple[int, int, Any]], Any]:
    """py-amqp's frame handler, reading an unreadable header frame as a stand-in."""
    on_frame = frame_handler(connection, callback, **kwargs)

    def on_guarded_frame(frame: tuple[int, int, Any]) -> Any:
        try:
            return on_frame(frame)
        except Exception as exc:  # RecursionError, and OSError, UnicodeDecodeError...
            frame_type, channel, buf = frame
            if frame_type != _HEADER_FRAME or (isinstance(exc, OSError) and _is_socket(exc)):
                raise
            # The partial message is still waiting for its header: give it one it can read.
            log.error(
                "a message on channel %d has properties that cannot be read (%s)",
                channel,
                type(exc).__name__,
            )
            return on_frame((frame_type, channel, _readable_header(buf)))

    return on_guarded_frame


def _is_socket(exc: OSError) -> bool:
    """Whether ``exc`` came from the connection rather than from reading a value (a
    header timestamp out of range raises ``OSError`` too, with no socket involved)."""
    return isinstance(exc, ConnectionError | TimeoutError)


class Connection(pyamqp.Connection):
    """kombu's AMQP connection with :func:`guarded_frame_handler`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("frame_handler", guarded_frame_handler)
        super().__init__(*args, **kwargs)


class Transport(pyamqp.Transport):
    """kombu's AMQP transport (``amqp://``, ``amqps://``, ``pyamqp://``), reading every
    message it is handed."""

    Connection = Connection
