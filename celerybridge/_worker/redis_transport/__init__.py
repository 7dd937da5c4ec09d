"""A kombu Redis transport for workers that loses no message it takes.

kombu's Redis transport pops a message (``BRPOP``) and only then records it as
unacknowledged: a worker killed, or a connection broken, in between loses it
(celery/celery#7950). Workers built by :func:`~celerybridge.celery_app` on ``redis://``,
``rediss://`` and ``sentinel://`` brokers use this one instead (Celery's
``broker_transport``), which keeps kombu's lists, priority lists and unacked records, so
stock producers, stock workers and celerybridge's publisher share one broker:

- ``scripts``: the Lua script that pops and records in one step, and dead-letters raw
  entries kombu could not record;
- ``channel``: waiting without taking (``BLMOVE``), taking, the raw-entry check;
- ``qos``: acknowledging, putting back (delivery counts), the visibility sweep;
- ``visibility``: refreshing the records of tasks still running, so a short visibility
  timeout never hands a running task to a second worker;
- ``transport``: the classes ``broker_transport`` names (plain, TLS, Sentinel).
"""

from __future__ import annotations

from ..._constants import MAX_DELIVERIES_OPTION, REFRESH_OPTION
from .transport import SentinelTransport, TlsTransport, Transport

__all__ = [
    "MAX_DELIVERIES_OPTION",
    "REFRESH_OPTION",
    "SentinelTransport",
    "TlsTransport",
    "Transport",
]
