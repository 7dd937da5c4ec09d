"""Side-by-side benchmark of celerybridge: ``python -m bench`` (or ``make bench``).

Measures, in one run, on Redis and on RabbitMQ, with a 1 KiB payload:

- fire-and-forget publish rate from one asyncio process, one at a time and 50
  concurrent: celerybridge (fast path and kombu path) vs the peers, FastStream's
  ``broker.publish`` and taskiq's ``kiq`` (``bench._peers``), vs Celery's ``send_task``
  (sync) vs ``send_task`` through ``anyio.to_thread`` vs an httpx POST to a FastAPI
  endpoint that only accepts the JSON (uvicorn in a subprocess) vs the raw ceiling
  (redis-py asyncio ``LPUSH`` of the same bytes; aio-pika publish with confirms on AMQP);
- event-loop lag p99 while 1,000 delegations are in flight (``bench._common.loop_lag``);
- publish rate and peak memory for 1 KiB, 64 KiB, 1 MiB and 16 MiB payloads;
- round trips (delegate, then await the result) against a real Celery worker
  (``bench.echo_worker``): how fast it drains a pre-filled queue (the ceiling), p50/p99
  one at a time and throughput with 50 in flight, vs ``send_task().get()`` and the same
  in 50 threads;
- with ``--broker-latency-ms`` (default list 0,2,20,100): distance. Bursts of 1,000
  delegations through a loopback delay proxy adding that much round-trip latency to
  the broker (``bench._distance``), fast path vs kombu path: accepted per second and
  how many were accepted within the publish timeout. ``--only-distance`` skips the rest.

It prints markdown tables and each target of issue 5 as MET or NOT MET, and writes a
plot (``--plot``, default ``docs/img/bench.png``). Brokers come from
``CELERYBRIDGE_TEST_REDIS_URL``, ``CELERYBRIDGE_TEST_AMQP_URL`` and
``CELERYBRIDGE_TEST_RESULT_BACKEND`` (Redis) as for the integration tests. Absolute
numbers depend on the machine; compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from ._common import BROKERS, ROOT, WIDTH, Row, log_dir
from ._distance import LATENCIES, BurstRow, distance_rows, print_distance_table
from ._peers import FASTSTREAM
from ._publish import (
    HTTP,
    RAW,
    SEND_TASK,
    SizeRow,
    http_rates,
    lag_label,
    loop_lag_rows,
    path_label,
    publish_rows,
    size_rows,
)
from ._roundtrip import DRAIN, GET, GET_THREADS, round_trip_rows

SECTIONS = ("publish", "loop lag", "round trip")
PARTS = ("http", "publish", "lag", "sizes", "round-trip")
"""What ``--only`` can pick: the HTTP baseline, then per broker the publish rates, the
loop lag, the payload sizes and the round trips."""


@dataclass
class Results:
    rows: list[Row]
    sizes: list[SizeRow]
    bursts: list[BurstRow]

    def value(self, broker: str, client: str) -> float | None:
        found = [r.value for r in self.rows if r.broker == broker and r.client == client]
        return found[0] if found else None


async def run(
    brokers: list[str],
    n: int,
    rt: int,
    in_flight: int,
    latencies: list[float],
    only: bool,
    parts: frozenset[str] = frozenset(PARTS),
) -> Results:
    results = Results([], [], [])
    if not only:
        await measure_all(results, brokers, n, rt, in_flight, parts)
    if latencies:
        shown = ", ".join(f"{ms:g}" for ms in latencies)
        print(f"distance: bursts through a delay proxy at +{shown} ms ...", flush=True)
        results.bursts = await distance_rows({b: BROKERS[b] for b in brokers}, latencies)
    return results


async def measure_all(
    results: Results,
    brokers: list[str],
    n: int,
    rt: int,
    in_flight: int,
    parts: frozenset[str] = frozenset(PARTS),
) -> None:
    http: tuple[float | None, float | None] = (None, None)
    if "http" in parts:
        print(f"HTTP baseline ({HTTP}) ...", flush=True)
        http = await http_rates(n)
    for broker in brokers:
        url = BROKERS[broker]
        if "publish" in parts:
            print(f"{broker}: publish rates ...", flush=True)
            results.rows += await publish_rows(broker, url, n, http)
        if "lag" in parts:
            print(f"{broker}: loop lag ...", flush=True)
            results.rows += await loop_lag_rows(broker, url)
        if "sizes" in parts:
            print(f"{broker}: payload sizes ...", flush=True)
            results.sizes += await size_rows(broker, url, n)
        if "round-trip" in parts:
            print(f"{broker}: round trips ...", flush=True)
            results.rows += await round_trip_rows(broker, url, rt, in_flight)


def print_tables(results: Results, n: int) -> None:
    if not results.rows:
        return
    print(f"\n| broker | measurement (1 KiB payload, {n} messages per rate) | result | note |")
    print("|---|---|---:|---|")
    section = ""
    for r in sorted(results.rows, key=lambda r: SECTIONS.index(r.section)):
        if r.section != section:
            section = r.section
            print(f"| | **{section}** | | |")
        print(f"| {r.broker} | {r.client} | {r.shown()} | {r.note} |")
    print("\n| broker | client | payload | messages | msg/s | MiB/s | peak memory | x payload |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for s in results.sizes:
        mib = s.size / 1024**2
        print(
            f"| {s.broker} | {s.client} | {size_label(s.size)} | {s.count} | {s.rate:,.0f} "
            f"| {s.rate * mib:,.1f} | {s.peak_mib:,.1f} MiB | {s.peak_mib / mib:.1f} |"
        )


def size_label(size: int) -> str:
    return f"{size // 1024**2} MiB" if size >= 1024**2 else f"{size // 1024} KiB"


def verdict(ok: bool | None) -> str:
    return "cannot be judged" if ok is None else ("MET" if ok else "NOT MET")


def target_lines(results: Results, brokers: list[str]) -> list[str]:
    """Issue 5's and issue 15's targets, per broker, from this run's numbers; a target
    whose numbers this run did not measure (``--only``) "cannot be judged"."""
    lines = []
    for b in brokers:
        ours = path_label(b)

        def value(client: str, b: str = b) -> float | None:
            return results.value(b, client)

        seq = value(f"{ours}, sequential")
        rate = value(f"{ours}, {WIDTH} in flight")
        lines += [
            target(f"{b}: publish sequential >= 60% of raw", seq, value(f"{RAW[b]}, sequential"),
                   0.6, "msg/s"),
            target(f"{b}: publish sequential >= 3x send_task", seq,
                   value(f"{SEND_TASK}, sequential"), 3.0, "msg/s"),
            target(f"{b}: round trip p50 <= send_task().get() p50", value(f"{ours}, p50"),
                   value(f"{GET}, p50"), 1.0, "ms", lower=True),
            target(f"{b}: {WIDTH} in flight >= 90% of the worker's drain rate", rate,
                   value(DRAIN), 0.9, "tasks/s"),
            target(f"{b}: {WIDTH} in flight above the thread workaround", rate,
                   value(GET_THREADS), 1.0, "tasks/s"),
            target(f"{b}: loop lag p99 <= 2 ms with 1,000 in flight", value(lag_label(ours)),
                   2.0, 1.0, "ms", lower=True),
        ]  # fmt: skip
        if b == "redis":  # issue 15; on RabbitMQ every client waits for the same confirm
            peer = value(f"{FASTSTREAM}, sequential")
            lines.append(target(f"{b}: publish sequential >= FastStream's", seq, peer, 1, "msg/s"))
    return lines


def target(
    what: str, ours: float | None, theirs: float | None, factor: float, unit: str,
    *, lower: bool = False,
) -> str:  # fmt: skip
    """``- what: MET (ours vs theirs unit = ratio)``: ours at least ``factor`` times theirs,
    or with ``lower`` at most."""
    if ours is None or not theirs:
        return f"- {what}: {verdict(None)}"
    ok = ours <= factor * theirs if lower else ours >= factor * theirs
    digits = ".2f" if unit == "ms" else ",.0f"
    return (
        f"- {what}: {verdict(ok)} ({ours:{digits}} vs {theirs:{digits}} {unit} = "
        f"{ours / theirs:.0%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="messages per publish rate")
    parser.add_argument("--rt", type=int, default=300, help="round trips one at a time")
    parser.add_argument(
        "--in-flight", type=int, default=1000, help=f"round trips with {WIDTH} in flight"
    )
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument(
        "--plot",
        type=Path,
        default=ROOT / "docs" / "img" / "bench.png",
        help="the figure; the distance bursts go beside it, as <name>-distance.png",
    )
    parser.add_argument(
        "--broker-latency-ms",
        nargs="?",
        const=",".join(f"{ms:g}" for ms in LATENCIES),
        default="",
        metavar="MS[,MS...]",
        help="also burst through a delay proxy adding these round-trip latencies "
        f"(without a list: {','.join(f'{ms:g}' for ms in LATENCIES)})",
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        metavar="PART[,PART...]",
        help=f"measure only these parts (of {', '.join(PARTS)}; default: all), "
        "e.g. --only publish for the publish rates alone",
    )
    parser.add_argument(
        "--only-distance",
        action="store_true",
        help="measure only the distance bursts (implies --broker-latency-ms)",
    )
    args = parser.parse_args()
    brokers = args.brokers.split(",")
    parts = frozenset(p.strip() for p in args.only.split(",") if p.strip())
    if parts - set(PARTS) or not parts:
        parser.error(f"--only takes parts among {', '.join(PARTS)}, not {args.only!r}")
    unknown = set(brokers) - set(BROKERS)
    if unknown:
        parser.error(f"unknown broker(s) {', '.join(sorted(unknown))}; known: redis, amqp")
    spec = args.broker_latency_ms or (
        ",".join(f"{ms:g}" for ms in LATENCIES) if args.only_distance else ""
    )
    try:
        latencies = [float(ms) for ms in spec.split(",") if ms.strip()]
    except ValueError:
        parser.error(f"--broker-latency-ms takes numbers separated by commas, not {spec!r}")
    if any(ms < 0 for ms in latencies):
        parser.error("--broker-latency-ms must be >= 0")
    started = time.monotonic()
    results = asyncio.run(
        run(brokers, args.n, args.rt, args.in_flight, latencies, args.only_distance, parts)
    )
    print_tables(results, args.n)
    if results.rows:
        print("\nTargets (issues 5 and 15):")
        print("\n".join(target_lines(results, brokers)))
    print_distance_table(results.bursts)
    try:
        from ._plot import plot, plot_distance  # matplotlib only once everything is measured
    except ImportError as exc:
        raise SystemExit(f"no plot: {exc}; install the dev extra: pip install -e '.[dev]'") from exc
    plots = []
    if results.rows:
        plot(results.rows, results.sizes, brokers, args.plot)
        plots.append(args.plot)
    if results.bursts:
        distance_path = args.plot.with_stem(f"{args.plot.stem}-distance")
        plot_distance(results.bursts, distance_path)
        plots.append(distance_path)
    shown = ", ".join(str(p) for p in plots)
    print(f"\nplot: {shown}; logs: {log_dir()}; took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
