"""The transport classes Celery's ``broker_transport`` names: plain, TLS and Sentinel.

Each is kombu's own with the channel of ``channel.py``. ``rediss://`` gets a class of its
own: kombu turns TLS on for a ``rediss`` scheme only when it picks the transport from the
URL, so a transport named through ``broker_transport`` would otherwise connect in the
clear when the URL has no ``ssl_*`` parameter. Like kombu then, it uses TLS without
checking the certificate (say ``?ssl_cert_reqs=required`` to check it) and warns.
"""

from __future__ import annotations

import logging
from ssl import CERT_NONE
from typing import Any

from kombu.transport import redis as kombu_redis

from ..._constants import MAX_BYTES_OPTION, MAX_DELIVERIES_OPTION, REFRESH_OPTION
from .channel import ReliableChannel
from .qos import QoS

log = logging.getLogger("celerybridge.redis")

OPTIONS = (MAX_BYTES_OPTION, MAX_DELIVERIES_OPTION, REFRESH_OPTION)
"""The transport options the channels read, besides kombu's."""


class Channel(ReliableChannel, kombu_redis.Channel):
    """kombu's Redis channel, taking messages atomically."""

    QoS = QoS
    from_transport_options = (*kombu_redis.Channel.from_transport_options, *OPTIONS)


class _LostConnection:
    """kombu calls a transport's ``_collect`` (Celery, through ``Connection.collect``) when
    the connection broke: the channels are told before they close, so they keep the
    messages of tasks still running instead of putting them back (to run twice)."""

    channels: Any
    close_connection: Any

    def _collect(self, connection: Any) -> None:
        for channel in list(self.channels):
            lost = getattr(channel, "celerybridge_connection_lost", None)
            if lost is not None:
                lost()
        try:
            self.close_connection(connection)
        except (*self.connection_errors, AttributeError, OSError):  # type: ignore[attr-defined]
            pass


class Transport(_LostConnection, kombu_redis.Transport):
    """kombu's Redis transport (``redis://``) that loses no message it takes."""

    Channel = Channel


class TlsChannel(Channel):
    """The channel of ``rediss://``: TLS even when the URL has no ``ssl_*`` parameter."""

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        conninfo = self.connection.client
        if not conninfo.ssl:
            log.warning(
                "Secure redis scheme specified (rediss) with no ssl options, "
                "defaulting to insecure SSL behaviour."
            )
            conninfo.ssl = {"ssl_cert_reqs": CERT_NONE}
        return super()._connparams(asynchronous)  # type: ignore[misc, no-any-return]


class TlsTransport(Transport):
    """The reliable transport for ``rediss://``."""

    Channel = TlsChannel


class SentinelChannel(ReliableChannel, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel, taking messages atomically."""

    QoS = QoS
    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options, *OPTIONS)


class SentinelTransport(_LostConnection, kombu_redis.SentinelTransport):
    """The reliable transport for ``sentinel://``."""

    Channel = SentinelChannel
