"""The worker's intake: what a message must be before Celery reads any of it.

- ``shape``: a well-formed protocol 2 JSON task message, bounded in size and depth;
- ``envelope``: raw Redis entries kombu could not parse, kept raw (the Redis transport
  that checks them, ``celerybridge._worker.redis_transport``, is apart);
- ``amqp``: AMQP headers py-amqp could not read, set apart;
- ``replay``: a signed message runs once while its signature is valid;
- ``consumer``: the gate in front of Celery's task handler, and the dead letters.

``consumer`` is not imported here: it imports ``celery.worker.consumer``, which binds
``celery.app.trace.build_tracer`` when imported. Celery imports it (by the name in
``worker_consumer``) only when a worker starts, after the app's module ran, so whatever
patches the tracer there (``sentry_sdk.init`` with its Celery integration) still takes
effect, as on a plain Celery worker.
"""

from __future__ import annotations

from ..._config import scheme_of
from ..._constants import MAX_BYTES_OPTION

__all__ = ["CONSUMER", "MAX_BYTES_OPTION", "intake_transport"]

CONSUMER = "celerybridge._worker.intake.consumer:IntakeConsumer"
"""Celery's ``worker_consumer`` for every worker :func:`~celerybridge.celery_app` builds."""

_TRANSPORTS = {
    "amqp": "celerybridge._worker.intake.amqp:Transport",
    "amqps": "celerybridge._worker.intake.amqp:Transport",
    "pyamqp": "celerybridge._worker.intake.amqp:Transport",
    "redis": "celerybridge._worker.redis_transport:Transport",
    "rediss": "celerybridge._worker.redis_transport:TlsTransport",
    "sentinel": "celerybridge._worker.redis_transport:SentinelTransport",
}


def intake_transport(broker_url: str) -> str | None:
    """The kombu transport (Celery's ``broker_transport``) a worker on this broker
    uses, or ``None`` for kombu's own: on Redis the reliable transport
    (``celerybridge._worker.redis_transport``: messages taken and recorded atomically, raw
    entries checked), on RabbitMQ headers py-amqp cannot read are set apart."""
    return _TRANSPORTS.get(scheme_of(broker_url))
