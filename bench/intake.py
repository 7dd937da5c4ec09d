"""What the worker's intake gate costs: drain rates with and without it, side by side.

``python -m bench.intake`` fills a queue with 1 KiB echo calls and times how fast a fresh
``bench.echo_worker`` (threads pool x8) empties it (``_roundtrip.drain_rate``), for:

- Celery's own consumer and kombu's own transport (``BENCH_STOCK_INTAKE=1``): no gate;
- the intake gate, as every ``celery_app()`` worker runs;
- the gate with a signing key: signature checked, and the replay record (one ``SET NX``
  per message, at intake) kept in this process's memory, then in the Redis result backend
  as shipped: the first tells the signature's cost from the record's round trip.

Rounds are interleaved and the best of each is kept: the machine is shared with the
brokers, so absolute numbers mean little; the ratios are the point.
"""

from __future__ import annotations

import argparse

import anyio

from celerybridge import Bridge
from tests._workers import Worker

from ._common import BROKERS, RESULT_BACKEND, delete_queue
from ._roundtrip import WORKER_CONCURRENCY, WORKER_POOL, drain_rate

KEY = "bench-intake-signing-key-" + "k" * 32
VARIANTS = {
    "Celery's consumer, no gate": ({"BENCH_STOCK_INTAKE": "1"}, None),
    "intake gate": ({}, None),
    "intake gate, signed, replay record in memory": (
        {"CELERYBRIDGE_SIGNING_KEY": KEY, "BENCH_MEMORY_REPLAY": "1"},
        KEY,
    ),
    "intake gate, signed, replay record in Redis (as shipped)": (
        {"CELERYBRIDGE_SIGNING_KEY": KEY},
        KEY,
    ),
}


async def one(broker_url: str, env: dict[str, str], key: str | None, n: int) -> float:
    worker = Worker(
        "bench.echo_worker", broker_url, RESULT_BACKEND, WORKER_POOL, WORKER_CONCURRENCY
    )
    worker.extra_env.update(env)
    try:
        async with Bridge(
            broker_url=broker_url, result_backend=RESULT_BACKEND, signing_key=key
        ) as bridge:
            return await drain_rate(bridge, worker, n)
    finally:
        worker.stop()
        delete_queue(broker_url, worker.queue)


async def run(brokers: list[str], n: int, rounds: int) -> None:
    best: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for broker in brokers:
            for name, (env, key) in VARIANTS.items():
                rate = await one(BROKERS[broker], env, key, n)
                best[broker, name] = max(best.get((broker, name), 0.0), rate)
    print(f"| broker | worker | drain rate ({n} x 1 KiB, best of {rounds}) | vs no gate |")
    print("|---|---|---:|---:|")
    for broker in brokers:
        base = best[broker, next(iter(VARIANTS))]
        for name in VARIANTS:
            rate = best[broker, name]
            print(f"| {broker} | {name} | {rate:,.0f} tasks/s | {rate / base:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="calls queued per drain")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--brokers", default="redis,amqp")
    args = parser.parse_args()
    anyio.run(run, args.brokers.split(","), args.n, args.rounds)


if __name__ == "__main__":
    main()
