"""A celerybridge worker laid out as services usually are: ``celerybridge`` imported
first, tracing set up after it (``sentry_sdk.init`` after ``import celerybridge`` is
the order that once lost every worker transaction).

Run as ``celery -A tests.ecosystem.worker worker -Q <queue>`` with ``CB_ECO_TOOL`` and
``CB_ECO_OUT`` set (``tracing.py``).
"""

from __future__ import annotations

import asyncio

from celerybridge import celery_app

from . import bindings, tracing

tracing.set_up()

app = celery_app("eco_worker")


@bindings.sync_trace.implement(app)
def sync_trace() -> dict[str, str]:
    return tracing.current()


@bindings.async_trace.implement(app)
async def async_trace() -> dict[str, str]:
    await asyncio.sleep(0)  # the body really suspends on the worker's loop
    return tracing.current()
