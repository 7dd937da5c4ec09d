"""The worker the round trips run against: ``celery -A bench.echo_worker worker -Q <queue>``.

It implements ``bench.echo`` and does nothing else, so the bench measures the way to
and from it rather than the work.
"""

from __future__ import annotations

import os

from celerybridge import celery_app

from ._common import echo

# bench.intake compares with Celery's own consumer and kombu's own transport: no gate.
STOCK = {"worker_consumer": "celery.worker.consumer:Consumer", "broker_transport": None}

if os.environ.get("BENCH_MEMORY_REPLAY"):
    # bench.intake: the replay record in this process's memory, to tell its Redis round
    # trips from the signature check in the cost of signing.
    from celerybridge._worker.intake import replay

    replay.store_for = lambda app: replay.MemorySeen()

conf = dict(STOCK) if os.environ.get("BENCH_STOCK_INTAKE") else {}
if os.environ.get("BENCH_STOCK_TRANSPORT"):
    # bench.redis_transport: the intake gate on kombu's own Redis transport, to weigh
    # celerybridge's reliable one against it.
    conf["broker_transport"] = "kombu.transport.redis:Transport"
app = celery_app("bench_echo_worker", **conf)


if os.environ.get("BENCH_ASYNC_ECHO"):
    # bench._roundtrip: the drain rate of celerybridge.AsyncioPool, on its coroutine path.

    @echo.implement(app)
    async def async_echo_impl(payload: str) -> int:
        return len(payload)

else:

    @echo.implement(app)
    def echo_impl(payload: str) -> int:
        return len(payload)
