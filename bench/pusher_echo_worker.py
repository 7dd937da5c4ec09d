"""The pusher's own app with a trivial async task, for ``bench.pusher``'s echo row::

    celery -A bench.pusher_echo_worker worker -Q <queue> --loglevel=info

The app, its pool, its concurrency (``PUSHER_CONCURRENCY``) and its delivery settings
are the pusher's (``pusher.celery``); the task only returns the length of its payload.
The worker CPU one such task costs is what the pool and celerybridge spend per task:
``bench.pusher`` adds it to raw aiobotocore's CPU per upload for the CPU target.
"""

from __future__ import annotations

from pusher.celery import app

from ._common import echo

__all__ = ["app"]


@echo.implement(app)
async def echo_impl(payload: str) -> int:
    return len(payload)
