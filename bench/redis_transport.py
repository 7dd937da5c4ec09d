"""What taking messages reliably costs on Redis: drain rates, kombu's transport vs ours.

``python -m bench.redis_transport`` fills a queue with 1 KiB echo calls and times how fast
a fresh ``bench.echo_worker`` (threads pool x8, the intake gate on) empties it
(``_roundtrip.drain_rate``), once on kombu's own Redis transport (``BRPOP``, then the
unacked record in a second round trip: a kill in between loses the message) and once on
celerybridge's (``BLMOVE`` to wait, one Lua script to pop and record; what ``celery_app``
workers use). The issue's target: at least 90% of kombu's rate.

Rounds are interleaved and the best of each is kept: the machine is shared with the
broker, so absolute numbers mean little; the ratio is the point.
"""

from __future__ import annotations

import argparse

import anyio

from celerybridge import Bridge
from tests._workers import Worker

from ._common import BROKERS, RESULT_BACKEND, delete_queue
from ._roundtrip import WORKER_CONCURRENCY, WORKER_POOL, drain_rate

TARGET = 0.9
VARIANTS = {
    "kombu's Redis transport (BRPOP, then record)": {"BENCH_STOCK_TRANSPORT": "1"},
    "celerybridge's reliable transport (as shipped)": {},
}


async def one(env: dict[str, str], n: int, pool: str) -> float:
    worker = Worker("bench.echo_worker", BROKERS["redis"], RESULT_BACKEND, pool, WORKER_CONCURRENCY)
    worker.extra_env.update(env)
    try:
        async with Bridge(broker_url=BROKERS["redis"], result_backend=RESULT_BACKEND) as bridge:
            return await drain_rate(bridge, worker, n)
    finally:
        worker.stop()
        delete_queue(BROKERS["redis"], worker.queue)


async def run(n: int, rounds: int, pools: list[str]) -> None:
    best: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for pool in pools:
            for name, env in VARIANTS.items():
                rate = await one(env, n, pool)
                best[pool, name] = max(best.get((pool, name), 0.0), rate)
    print(f"| pool | worker transport | drain rate ({n} x 1 KiB, best of {rounds}) | vs kombu |")
    print("|---|---|---:|---:|")
    verdicts = []
    for pool in pools:
        base = best[pool, next(iter(VARIANTS))]
        for name in VARIANTS:
            rate = best[pool, name]
            label = f"{pool} x{WORKER_CONCURRENCY}"
            print(f"| {label} | {name} | {rate:,.0f} tasks/s | {rate / base:.0%} |")
        ours = best[pool, list(VARIANTS)[-1]] / base
        verdicts.append(
            f"{pool}: {ours:.0%} of kombu's rate, target {TARGET:.0%}: "
            + ("MET" if ours >= TARGET else "NOT MET")
        )
    print("\n" + "\n".join(verdicts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="calls queued per drain")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pools", default=WORKER_POOL, help="comma-separated: threads,prefork")
    args = parser.parse_args()
    anyio.run(run, args.n, args.rounds, args.pools.split(","))


if __name__ == "__main__":
    main()
