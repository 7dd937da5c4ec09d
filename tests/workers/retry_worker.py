"""A celerybridge worker whose tasks always fail and are retried at once (countdown 0),
as ``retry_jitter`` can make the pusher's retries.

Run as ``celery -A tests.workers.retry_worker worker -Q <queue>``.

The retry message (same task id) is published before the tracer stores RETRY for the
attempt that sent it, so another pool thread may run the retry, exhaust the retries and
store FAILURE first. ``retry.flaky`` leaves that race to chance; ``retry.flaky_late``
widens it by waiting ``LATE`` seconds between publishing and storing, as a loaded
worker may.
"""

from __future__ import annotations

import time
from typing import Any

from celery.exceptions import Retry

from celerybridge import celery_app
from celerybridge._worker.dead_letter import DeadLetterTask

from . import retry_bindings

LATE = 0.3

app = celery_app("retry_worker")


class Flaky(Exception):
    """Raised by every attempt."""


AT_ONCE: dict[str, Any] = {
    "autoretry_for": (Flaky,),
    "retry_backoff": False,
    "default_retry_delay": 0,
    "max_retries": 1,
}


class LateRetryStore(DeadLetterTask):
    """Sleeps after publishing the retry message, before the tracer stores RETRY."""

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().retry(*args, **kwargs)
        except Retry:
            time.sleep(LATE)
            raise


@retry_bindings.flaky.implement(app, **AT_ONCE)
def flaky(n: int) -> None:
    raise Flaky(f"call {n} failed")


@retry_bindings.flaky_late.implement(app, base=LateRetryStore, **AT_ONCE)
def flaky_late(n: int) -> None:
    raise Flaky(f"call {n} failed")
