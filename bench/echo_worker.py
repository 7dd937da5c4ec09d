"""The worker the round trips run against: ``celery -A bench.echo_worker worker -Q <queue>``.

It implements ``bench.echo`` and does nothing else, so the bench measures the way to
and from it rather than the work.
"""

from __future__ import annotations

from celerybridge import celery_app

from ._common import echo

app = celery_app("bench_echo_worker")


@echo.implement(app)
def echo_impl(payload: str) -> int:
    return len(payload)
