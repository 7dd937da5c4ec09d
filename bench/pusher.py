"""Pusher upload throughput and CPU against raw aiobotocore and a plain Celery + boto3 worker.

Run: ``python -m bench.pusher [--uploads 1000] [--concurrency 32,256] [--size 1024]
[--brokers redis,amqp] [--s3-latency-ms 0] [--pusher-pool POOL] [--no-plain]
[--profile DIR [--profile-what cpu|wall]]``.

Measures, in one run, against one moto S3 server (started here, on a free port), at
each concurrency of ``--concurrency`` (uploads in flight), how many uploads of
``--size`` bytes per second get through and what CPU each costs:

- raw aiobotocore ``put_object``: one process, one client, that many coroutines in
  flight; the ceiling for any Python uploader on this machine;
- end to end through the pusher (``celery -A pusher worker`` on its own pool, or
  ``--pusher-pool``; ``PUSHER_CONCURRENCY`` = the concurrency), per broker: a
  celerybridge caller keeps that many uploads in flight (delegate, then await the
  receipt);
- an echo task on the pusher's app and pool (``bench.pusher_echo_worker``): the same
  calls with nothing uploaded, so its worker CPU per task is the pool's and
  celerybridge's own cost per task;
- unless ``--no-plain``, the same caller against a plain Celery worker uploading with
  boto3 (``bench/plain_boto3_worker.py``), once with Celery's default prefork pool and
  concurrency (what a plain Celery user gets) and once with ``--pool=threads
  --concurrency=<concurrency>``.

Every S3 path sends the same request (``ChecksumSHA256``, ``ContentType``). Each
measurement starts with an untimed warm-up of as many uploads as are in flight, in a
worker started for it; rates count from the first send to the last result. After each
upload run the objects are counted in S3. For each worker the table gives its CPU per
upload, the most threads it had at once and its peak resident memory (``VmHWM``).
It ends with a markdown table and whether the issue's targets are met, per
concurrency and broker: the pusher >= 90 % of raw aiobotocore; its worker CPU per
upload <= 1.25 x (raw aiobotocore's CPU per upload + the echo task's worker CPU per
task); >= 2x the plain prefork boto3 worker.

Against moto on loopback an upload costs about a millisecond of S3 time, so every row
is bound by the CPU of this machine, not by waiting on S3. ``--s3-latency-ms N`` puts
a delay proxy (its own process, loopback only) between every measured path and moto
that holds each HTTP request back by N ms, as a network round trip to S3 would; the
setup (bucket creation, counting objects) goes direct. ``--profile DIR`` records the
pusher and echo workers of each measurement with py-spy (if installed) into DIR:
the thread holding the GIL, or with ``--profile-what wall`` every thread, waits
included.

Needs Redis and RabbitMQ on loopback (``CELERYBRIDGE_TEST_REDIS_URL``,
``CELERYBRIDGE_TEST_AMQP_URL``, ``CELERYBRIDGE_TEST_RESULT_BACKEND`` override them).
Absolute numbers depend on the machine; compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import boto3
from aiobotocore.session import get_session
from botocore.config import Config

from celerybridge import Bridge
from pusher.bindings import send_to_s3

from ._common import BROKERS, RESULT_BACKEND, RUN, echo
from ._cpu import CpuMeter
from ._pusher_report import ECHO, PLAIN_PREFORK, PLAIN_THREADS, PUSHER, RAW, Row, report
from ._s3rig import Worker, delay_proxy, moto_server

BUCKET = f"cb-bench-{RUN}"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def checksum_of(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


async def keep_in_flight(
    one: Callable[[str], Awaitable[None]],
    prefix: str,
    n: int,
    width: int,
    meter: CpuMeter | None = None,
) -> float:
    """Run ``one(key)`` for ``n`` keys under ``prefix``, ``width`` at a time; calls/s.
    ``meter`` measures the CPU used meanwhile."""
    keys = iter(range(n))

    async def lane() -> None:
        for i in keys:
            await one(f"{prefix}{i:06d}.json")

    with meter or nullcontext():
        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(lane() for _ in range(width)))
        elapsed = asyncio.get_running_loop().time() - started
    return n / elapsed


async def raw_aiobotocore(
    endpoint: str, prefix: str, n: int, width: int, size: int, meter: CpuMeter
) -> float:
    config = Config(max_pool_connections=width, retries={"mode": "standard"})
    async with get_session().create_client(
        "s3", endpoint_url=endpoint, config=config, **aws_credentials()
    ) as client:

        async def put(key: str) -> None:
            body = ("x" * size).encode()
            await client.put_object(
                Bucket=BUCKET,
                Key=key,
                Body=body,
                ChecksumSHA256=checksum_of(body),
                ContentType="application/json",
                Metadata={},
            )

        await keep_in_flight(put, f"{prefix}warm-up/", width, width)
        return await keep_in_flight(put, prefix, n, width, meter)


async def end_to_end(
    broker_url: str, queue: str, prefix: str, n: int, width: int, size: int, meter: CpuMeter
) -> float:
    stub = send_to_s3.with_options(queue=queue)
    content = "x" * size
    async with Bridge(broker_url=broker_url, result_backend=RESULT_BACKEND) as bridge:

        async def upload(key: str) -> None:
            handle = await bridge.send(stub, (key, content), {})
            receipt = await handle.result(timeout=120)
            if receipt.key != key or receipt.size != size:
                raise RuntimeError(f"unexpected receipt for {key}: {receipt!r}")

        await keep_in_flight(upload, f"{prefix}warm-up/", width, width)
        return await keep_in_flight(upload, prefix, n, width, meter)


async def echoes(
    broker_url: str, queue: str, n: int, width: int, size: int, meter: CpuMeter
) -> float:
    stub = echo.with_options(queue=queue)
    payload = "x" * size
    async with Bridge(broker_url=broker_url, result_backend=RESULT_BACKEND) as bridge:

        async def one(_: str) -> None:
            handle = await bridge.send(stub, (payload,), {})
            if await handle.result(timeout=120) != size:
                raise RuntimeError("unexpected echo")

        await keep_in_flight(one, "", width, width)
        return await keep_in_flight(one, "", n, width, meter)


def aws_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
    }


def count_objects(s3: Any, prefix: str) -> int:
    """Objects directly under ``prefix`` (the warm-up's sub-prefix left out)."""
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix, Delimiter="/"
    )
    return sum(len(page.get("Contents", [])) for page in pages)


def log_problems(log: str) -> list[str]:
    """Lines of a worker log worth a look: errors, warnings, tracebacks, retries."""
    marks = ("ERROR", "WARNING", "CRITICAL", "Traceback", "Retry in")
    return [line for line in log.splitlines() if any(m in line for m in marks)]


def pool_of(log: str) -> str:
    """The pool a worker's banner names (``concurrency: 32 (thread)``)."""
    found = re.search(r"concurrency:\s*\d+ \(([^)]+)\)", log)
    name = found.group(1) if found else "?"
    return {"pool": "celerybridge.AsyncioPool", "thread": "threads"}.get(name, name)


def py_spy() -> str | None:
    """py-spy's path: on PATH or beside this Python (a venv not activated)."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


PROFILE_WALL = "wall"
"""``--profile-what wall``: every thread all the time (waits included), not CPU."""


@contextmanager
def profiled(pid: int, out: Path | None, what: str = "cpu") -> Iterator[None]:
    """py-spy records ``pid`` meanwhile into ``out`` as collapsed stacks: the thread
    holding the GIL (``cpu``), or every thread, idle or not (``wall``); nothing when
    ``out`` is None."""
    spy = py_spy()
    if out is None or spy is None:
        yield
        return
    which = "--idle" if what == PROFILE_WALL else "--gil"
    command = [spy, "record", "-p", str(pid), "-f", "raw", "-o", str(out), "-r", "200"]
    process = subprocess.Popen(
        [*command, "--nonblocking", which],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)


def run(
    brokers: list[str],
    n: int,
    widths: list[int],
    size: int,
    latency_ms: int,
    *,
    pusher_pools: list[str],
    plain: bool,
    profile: Path | None,
    profile_what: str = "cpu",
) -> list[Row]:
    rows: list[Row] = []
    with moto_server() as moto, delay_proxy(moto, latency_ms) as endpoint:
        s3 = boto3.client("s3", endpoint_url=moto, **aws_credentials())
        s3.create_bucket(Bucket=BUCKET)
        for width in widths:
            worker_env = {
                **AWS_ENV,
                "AWS_ENDPOINT_URL_S3": endpoint,
                "CELERYBRIDGE_RESULT_BACKEND": RESULT_BACKEND,
                "PUSHER_BUCKET": BUCKET,
                "PUSHER_CONCURRENCY": str(width),
            }

            def record(
                measurement: str,
                broker: str,
                prefix: str | None,
                rate: float,
                meter: CpuMeter,
                pool: str = "",
            ) -> None:
                landed = count_objects(s3, prefix) if prefix is not None else n
                rows.append(
                    Row(measurement, broker, width, rate, n, f"{landed}/{n}", meter.use, pool)  # noqa: B023
                )
                status = "ok" if landed == n else "MISSING OBJECTS"
                print(
                    f"  {measurement} [{broker}, {width} in flight]: {rate:,.0f}/s; "  # noqa: B023
                    f"{landed} of {n} landed ({status})",
                    flush=True,
                )

            prefix = f"raw-{width}/"
            meter = CpuMeter()
            rate = asyncio.run(raw_aiobotocore(endpoint, prefix, n, width, size, meter))
            record(RAW, "-", prefix, rate, meter)

            for broker in brokers:
                url = BROKERS[broker]
                workers = []
                for pool in pusher_pools:
                    pusher_args = (f"--pool={pool}",) if pool else ()
                    workers += [
                        (PUSHER, Worker("pusher", url, worker_env, pusher_args)),
                        (ECHO, Worker("bench.pusher_echo_worker", url, worker_env, pusher_args)),
                    ]
                if plain:
                    workers += [
                        (PLAIN_PREFORK, Worker("bench.plain_boto3_worker", url, worker_env)),
                        (
                            PLAIN_THREADS,
                            Worker(
                                "bench.plain_boto3_worker",
                                url,
                                worker_env,
                                ("--pool=threads", f"--concurrency={width}"),
                            ),
                        ),
                    ]
                for measurement, worker in workers:
                    prefix = f"{broker}/{worker.queue}/"
                    out = (
                        profile / f"{broker}-{width}-{worker.app}-{worker.queue}.txt"
                        if profile
                        else None
                    )
                    with worker.running() as running:
                        meter = CpuMeter(running.pid)
                        pool = pool_of(worker.log())
                        label = (
                            f"{measurement} ({pool})"
                            if measurement in (PUSHER, ECHO)
                            else measurement
                        )
                        spied = profiled(
                            running.pid,
                            out if measurement in (PUSHER, ECHO) else None,
                            profile_what,
                        )
                        with spied:
                            if measurement == ECHO:
                                rate = asyncio.run(echoes(url, worker.queue, n, width, size, meter))
                            else:
                                rate = asyncio.run(
                                    end_to_end(url, worker.queue, prefix, n, width, size, meter)
                                )
                        landed = None if measurement == ECHO else prefix
                        record(label, broker, landed, rate, meter, pool)
                    problems = log_problems(worker.log())
                    if problems:
                        print(f"    {len(problems)} log lines to look at in {worker.log_path}:")
                        for line in problems[:5]:
                            print(f"      {line[:200]}")
    return rows


def _widths(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError("concurrencies must be >= 1")
    return widths


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--uploads", type=int, default=1000, help="uploads per measurement")
    parser.add_argument(
        "--concurrency",
        type=_widths,
        default=[32, 256],
        help="uploads in flight, comma-separated: each is measured (default 32,256)",
    )
    parser.add_argument("--size", type=int, default=1024, help="bytes per object")
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument(
        "--s3-latency-ms",
        type=int,
        default=0,
        help="delay added to every S3 request by a loopback proxy (0: moto direct)",
    )
    parser.add_argument(
        "--pusher-pool",
        default="",
        help="run the pusher (and its echo task) with each of these -P, comma-separated; "
        "empty: its own pool (e.g. ',threads' measures both)",
    )
    parser.add_argument("--no-plain", action="store_true", help="skip the plain boto3 workers")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy the pusher and echo workers into this folder",
    )
    parser.add_argument(
        "--profile-what",
        choices=("cpu", PROFILE_WALL),
        default="cpu",
        help="cpu: the thread holding the GIL; wall: every thread, waits included",
    )
    args = parser.parse_args()
    brokers = args.brokers.split(",")
    unknown = set(brokers) - set(BROKERS)
    if unknown:
        parser.error(f"unknown broker(s) {', '.join(sorted(unknown))}; known: redis, amqp")
    if args.s3_latency_ms < 0:
        parser.error("--s3-latency-ms must be >= 0")
    if args.profile is not None:
        if py_spy() is None:
            parser.error("--profile needs py-spy (pip install py-spy)")
        args.profile.mkdir(parents=True, exist_ok=True)
    rows = run(
        brokers,
        args.uploads,
        args.concurrency,
        args.size,
        args.s3_latency_ms,
        pusher_pools=args.pusher_pool.split(","),
        plain=not args.no_plain,
        profile=args.profile,
        profile_what=args.profile_what,
    )
    report(rows, args.uploads, args.size, args.s3_latency_ms)


if __name__ == "__main__":
    main()
