"""The pusher worker: ``celery -A pusher worker -Q pusher --loglevel=info``.

Celery finds this module as ``pusher.celery`` and its ``app``. Settings come from
``CELERYBRIDGE_*`` (broker, result backend), ``PUSHER_*`` (bucket, concurrency,
limits) and the AWS chain (credentials, region, ``AWS_ENDPOINT_URL_S3``). ``PUSHER_*``
settings are read when a worker starts (Celery's ``celeryd_init``), not at import: tools
that only import the app (``celerybridge check pusher``) need none of them. A
configuration that could lose or duplicate tasks stops the worker before it takes a task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiobotocore.session import get_session
from celery import signals
from pydantic import ValidationError

from celerybridge import ConfigurationError, caller_service, celery_app, worker_resource
from celerybridge._config import load_settings, scheme_of

from . import _s3
from ._settings import PusherSettings
from .bindings import QUEUE, Receipt, send_to_s3, send_to_s3_v2, send_to_s3_v3
from .errors import PermanentUploadError, TransientUploadError

logger = logging.getLogger("pusher")


@functools.cache
def settings() -> PusherSettings:
    """The ``PUSHER_*`` settings, read once (first at worker start), or
    :class:`ConfigurationError` saying which are wrong."""
    try:
        return PusherSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"PUSHER_{'_'.join(str(p) for p in e['loc']).upper() or 'SETTINGS'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False)
        )
        raise ConfigurationError(f"the pusher cannot start: {problems}") from None


def _redis_delivery(loaded: PusherSettings) -> dict[str, float]:
    """Redis redelivers an unacknowledged task once its visibility timeout has passed,
    but kombu only sweeps for such tasks every interval x throttle seconds (100 s by
    default). Sweep at a quarter of the timeout instead, so a task of a killed worker
    comes back within about 1.25 x the visibility timeout."""
    return {
        "visibility_timeout": loaded.visibility_timeout,
        "unacked_restore_interval": max(1.0, min(10.0, loaded.visibility_timeout / 4)),
        "unacked_restore_throttle": 1,
    }


bridge_settings = load_settings()
_redis = scheme_of(bridge_settings.broker_url) in {"redis", "rediss", "sentinel"}

app = celery_app(
    "pusher",
    bridge_settings,
    # Uploads wait on the network: threads sharing one event loop and one S3 client.
    # worker_concurrency: PUSHER_CONCURRENCY, set at worker start (_configure).
    worker_pool="threads",
    task_default_queue=QUEUE,
    # At-least-once: acknowledge after the upload; a lost worker means redelivery
    # (on Redis and RabbitMQ; the demo's filesystem transport cannot redeliver).
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # After a broker reconnection Celery would lower the prefetch count by the tasks
    # still running and raise it back as they end; on RabbitMQ the worker then stopped
    # taking tasks until the broker dropped it for missed heartbeats, some 3 minutes
    # later (tests/faults/test_broker_restart.py). With one task per thread prefetched
    # there is nothing to save.
    worker_enable_prefetch_count_reduction=False,
    broker_connection_retry_on_startup=True,
    # A receipt the backend cannot take yet is retried until it can (10 s apart at
    # most): giving up would report a failure for an object that landed.
    result_backend_always_retry=True,
    result_backend_max_retries=float("inf"),
)

_RETRY: dict[str, Any] = {
    "autoretry_for": (TransientUploadError,),
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    # max_retries: PUSHER_MAX_RETRIES, set at worker start (_configure).
}


@worker_resource
async def s3() -> AsyncIterator[Any]:
    """One S3 client per worker process, on its event loop, closed at shutdown."""
    async with get_session().create_client("s3", config=_s3.client_config(settings())) as client:
        yield client


@send_to_s3.implement(app, **_RETRY)
async def store(key: str, content: str) -> Receipt:
    """v1: store the content as it is."""
    return await _s3.upload(
        await s3(), settings(), key, content.encode(), {}, service=caller_service()
    )


@send_to_s3_v2.implement(app, **_RETRY)
async def store_v2(key: str, content: str, meta: dict[str, str]) -> Receipt:
    """v2: store the content with ``meta`` as S3 user metadata."""
    return await _s3.upload(
        await s3(), settings(), key, content.encode(), meta, service=caller_service()
    )


@send_to_s3_v3.implement(app, **_RETRY)
async def store_v3(
    key: str,
    content: bytes,
    meta: dict[str, str] | None = None,
    content_type: str = "application/octet-stream",
    revision: int | None = None,
) -> Receipt:
    """v3: store bytes as they are, with their content type; ordered by ``revision``."""
    client = await s3()
    return await _s3.upload(
        client,
        settings(),
        key,
        content,
        meta or {},
        content_type=content_type,
        revision=revision,
        service=caller_service(),
    )


async def _check(loaded: PusherSettings) -> None:
    async with get_session().create_client("s3", config=_s3.client_config(loaded)) as client:
        await _s3.check_bucket(client, loaded.bucket)


def _cannot_start(problem: object) -> SystemExit:
    logger.critical("the pusher cannot start: %s", problem)
    return SystemExit(f"the pusher cannot start: {problem}")


def _loaded() -> PusherSettings:
    """:func:`settings`, or :class:`SystemExit` saying which are wrong (Celery's signal
    dispatch logs and swallows an ``Exception``, not a ``SystemExit``)."""
    try:
        return settings()
    except ConfigurationError as exc:
        raise _cannot_start(str(exc).removeprefix("the pusher cannot start: ")) from None


def _reliable_transport(conf: Any) -> bool:
    """Whether the worker takes from Redis with celerybridge's transport (running tasks'
    records refreshed), not kombu's own (``broker_transport="redis"``)."""
    return str(conf.broker_transport or "").startswith("celerybridge._worker.redis_transport")


def _apply(conf: Any) -> None:
    """Configure the worker from ``PUSHER_*`` (again: the same values, so harmless)."""
    loaded = _loaded()
    conf.worker_concurrency = loaded.concurrency
    problem = loaded.visibility_problem()
    if _redis and problem is not None and not _reliable_transport(conf):
        raise _cannot_start(
            f"{problem}: kombu's Redis transport (broker_transport) redelivers tasks that "
            "are still running"
        )
    if _redis:
        conf.broker_transport_options = {
            **conf.broker_transport_options,
            **_redis_delivery(loaded),
        }
    for stub in (send_to_s3, send_to_s3_v2, send_to_s3_v3):
        app.tasks[stub.wire_name].max_retries = loaded.max_retries


@signals.celeryd_init.connect(weak=False)
def _configure(conf: Any, **_: Any) -> None:
    """Read ``PUSHER_*`` and configure the worker from them; Celery sends this signal
    before it reads its own worker settings (concurrency, broker options)."""
    _apply(conf)


@signals.worker_init.connect(weak=False)
def _configure_in_process(sender: Any = None, **_: Any) -> None:
    """The same for workers started in-process (``WorkController``,
    ``celery.contrib.testing.worker.start_worker``): Celery sends them no
    ``celeryd_init``. Their concurrency is the caller's; retries and broker options
    are still read from here."""
    if getattr(sender, "app", app) is app:  # not another app's worker in this process
        _apply(app.conf)


@signals.worker_init.connect(weak=False)
def _check_at_start(sender: Any = None, **_: Any) -> None:
    """One clear error at start instead of a stack trace per task."""
    if getattr(sender, "app", app) is not app:  # another app's worker in this process
        return
    try:
        asyncio.run(_check(_loaded()))
    except PermanentUploadError as exc:
        raise _cannot_start(exc) from None


@signals.worker_ready.connect(weak=False)
def _announce(**_: Any) -> None:
    # Logged here, not at the check: Celery sets up logging only after worker_init.
    problem = settings().visibility_problem()
    if _redis and problem is not None and _reliable_transport(app.conf):
        logger.warning(
            "%s: celerybridge's Redis transport refreshes the records of running tasks, so "
            "none is delivered twice while its worker lives; a worker that stalls longer "
            "than the visibility timeout may see its task run again elsewhere",
            problem,
        )
    logger.info(
        "pusher ready: bucket %r, %d uploads in flight per process",
        settings().bucket,
        settings().concurrency,
    )
