"""Pusher upload throughput against raw aiobotocore and a plain Celery + boto3 worker.

Run: ``python -m bench.pusher [--uploads 1000] [--concurrency 32] [--size 1024]
[--brokers redis,amqp] [--s3-latency-ms 0]``.

Measures, in one run, against one moto S3 server (started here, on a free port) and
at one concurrency, how many uploads of ``--size`` bytes per second get through:

- raw aiobotocore ``put_object``: one process, one client, ``--concurrency``
  coroutines in flight; the ceiling for any Python uploader on this machine;
- end to end through the pusher (``celery -A pusher worker``, threads pool, one
  event loop and one aiobotocore client), per broker: a celerybridge caller keeps
  ``--concurrency`` uploads in flight (delegate, then await the receipt);
- the same caller against a plain Celery worker uploading with boto3
  (``bench/plain_boto3_worker.py``), once with Celery's default prefork pool and
  concurrency (what a plain Celery user gets) and once with ``--pool=threads
  --concurrency=<concurrency>``.

Every S3 path sends the same request (``ChecksumSHA256``, ``ContentType``). Each
measurement starts with an untimed warm-up of ``--concurrency`` uploads; rates count
from the first send to the last result. After each end-to-end run the objects are
counted in S3. It ends with a markdown table and whether the issue's targets are met:
end to end >= 90 % of raw aiobotocore, and >= 2x the plain prefork boto3 worker.

Against moto on loopback an upload costs about a millisecond of S3 time, so every row
is bound by the CPU of this machine, not by waiting on S3. ``--s3-latency-ms N`` puts
a delay proxy (its own process, loopback only) between every measured path and moto
that holds each HTTP request back by N ms, as a network round trip to S3 would; the
setup (bucket creation, counting objects) goes direct. Run once per latency, e.g.
``python -m bench.pusher`` and ``python -m bench.pusher --s3-latency-ms 100``; each
table says which latency it was measured at.

Needs Redis and RabbitMQ on loopback (``CELERYBRIDGE_TEST_REDIS_URL``,
``CELERYBRIDGE_TEST_AMQP_URL``, ``CELERYBRIDGE_TEST_RESULT_BACKEND`` override them).
Absolute numbers depend on the machine; compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any

import boto3
from aiobotocore.session import get_session
from botocore.config import Config

from celerybridge import Bridge
from pusher.bindings import send_to_s3

from ._common import BROKERS, RESULT_BACKEND, ROOT, RUN, delete_queue, free_port, log_dir
from ._cpu import CpuMeter, CpuUse
from ._proxy import forward

BUCKET = f"cb-bench-{RUN}"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

RAW = "raw aiobotocore put_object"
PUSHER = "pusher worker (threads, aiobotocore)"
PLAIN_PREFORK = "plain Celery worker, boto3 (default prefork)"
PLAIN_THREADS = "plain Celery worker, boto3 (threads)"


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL the process group (prefork children included)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children left behind by a dead parent


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's standalone server on a free port; yields its URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (log_dir() / "moto.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except (urllib.error.URLError, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start, see {log.name}") from None
                time.sleep(0.1)
        yield url
    finally:
        stop_process(process)
        log.close()


HTTP_METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, sleeping ``delay`` s before each chunk that starts
    an HTTP request (per request, so keep-alive connections are delayed every time)."""
    try:
        while data := await reader.read(65536):
            if delay and data.startswith(HTTP_METHODS):
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def serve_delay_proxy(listener: socket.socket, target_port: int, delay: float) -> None:
    """Forward connections on ``listener`` to ``127.0.0.1:target_port`` (runs forever),
    each HTTP request ``delay`` s late."""
    forward(
        listener,
        target_port,
        functools.partial(_pipe, delay=delay),
        functools.partial(_pipe, delay=0),
    )


@contextmanager
def delay_proxy(target: str, latency_ms: int) -> Iterator[str]:
    """Yields an endpoint that reaches ``target`` (``http://127.0.0.1:<port>``) with
    ``latency_ms`` added to every HTTP request; ``target`` itself when it is 0.

    The proxy runs in a process of its own, so it competes for the GIL with nothing
    it measures; the listening socket is bound here, so it accepts from the start."""
    if latency_ms <= 0:
        yield target
        return
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = listener.getsockname()[1]
    target_port = int(target.rsplit(":", 1)[1])
    process = multiprocessing.get_context("fork").Process(
        target=serve_delay_proxy,
        args=(listener, target_port, latency_ms / 1000),
        name="s3-delay-proxy",
        daemon=True,
    )
    process.start()
    listener.close()  # the proxy process holds its own copy
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.join(5)


@dataclass
class Worker:
    """A ``celery -A <app> worker -Q <queue>`` subprocess and its log file."""

    app: str
    broker_url: str
    env: dict[str, str]
    pool_args: tuple[str, ...] = ()
    """Empty: the app's own pool settings (the pusher's threads, Celery's prefork)."""

    pid: int = 0
    """The worker's process id while it runs."""

    def __post_init__(self) -> None:
        self.queue = f"cb-bench-{self.app.replace('.', '-')}-{uuid.uuid4().hex[:8]}"
        self.log_path = log_dir() / f"{self.queue}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @contextmanager
    def running(self, timeout: float = 60.0) -> Iterator[Worker]:
        command = [
            sys.executable, "-m", "celery", "-A", self.app, "worker",
            "-Q", self.queue, "-n", f"{self.queue}@%h", "--loglevel=info",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            *self.pool_args,
        ]  # fmt: skip
        env = {
            **os.environ,
            **self.env,
            "CELERYBRIDGE_BROKER_URL": self.broker_url,
            "PYTHONPATH": str(ROOT),
        }
        with self.log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while " ready." not in self.log():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.app} worker did not start:\n{self.log()}")
                time.sleep(0.05)
            self.pid = process.pid
            yield self
        finally:
            stop_process(process)
            delete_queue(self.broker_url, self.queue)


def checksum_of(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


async def keep_in_flight(
    one: Callable[[str], Awaitable[None]],
    prefix: str,
    n: int,
    width: int,
    meter: CpuMeter | None = None,
) -> float:
    """Run ``one(key)`` for ``n`` keys under ``prefix``, ``width`` at a time; uploads/s.
    ``meter`` measures the CPU used meanwhile."""
    keys = iter(range(n))

    async def lane() -> None:
        for i in keys:
            await one(f"{prefix}{i:06d}.json")

    with meter or nullcontext():
        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(width)))
        elapsed = time.perf_counter() - started
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
            receipt = await handle.result(timeout=60)
            if receipt.key != key or receipt.size != size:
                raise RuntimeError(f"unexpected receipt for {key}: {receipt!r}")

        await keep_in_flight(upload, f"{prefix}warm-up/", width, width)
        return await keep_in_flight(upload, prefix, n, width, meter)


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


@dataclass
class Row:
    measurement: str
    broker: str
    rate: float
    n: int
    landed: str = ""
    cpu: CpuUse | None = None

    def cpu_columns(self) -> str:
        """Machine busy, and the caller's and worker's CPU milliseconds per upload."""
        if self.cpu is None:
            return "- | - | -"
        busy = self.cpu.machine_busy
        worker = self.cpu.worker_s
        return " | ".join(
            (
                f"{busy:.0%}",
                f"{self.cpu.caller_s * 1000 / self.n:.2f}",
                f"{worker * 1000 / self.n:.2f}" if worker is not None else "-",
            )
        )


def run(brokers: list[str], n: int, width: int, size: int, latency_ms: int) -> list[Row]:
    rows: list[Row] = []
    with moto_server() as moto, delay_proxy(moto, latency_ms) as endpoint:
        s3 = boto3.client("s3", endpoint_url=moto, **aws_credentials())
        s3.create_bucket(Bucket=BUCKET)
        worker_env = {
            **AWS_ENV,
            "AWS_ENDPOINT_URL_S3": endpoint,
            "CELERYBRIDGE_RESULT_BACKEND": RESULT_BACKEND,
            "PUSHER_BUCKET": BUCKET,
            "PUSHER_CONCURRENCY": str(width),
        }

        def record(
            measurement: str, broker: str, prefix: str, rate: float, meter: CpuMeter
        ) -> None:
            landed = count_objects(s3, prefix)
            rows.append(Row(measurement, broker, rate, n, f"{landed}/{n}", meter.use))
            status = "ok" if landed == n else "MISSING OBJECTS"
            print(
                f"  {measurement} [{broker}]: {rate:,.0f} uploads/s; "
                f"{landed} of {n} objects under s3://{BUCKET}/{prefix} ({status})",
                flush=True,
            )

        prefix = "raw/"
        meter = CpuMeter()
        rate = asyncio.run(raw_aiobotocore(endpoint, prefix, n, width, size, meter))
        record(RAW, "-", prefix, rate, meter)

        for broker in brokers:
            url = BROKERS[broker]
            workers = [
                (PUSHER, Worker("pusher", url, worker_env)),
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
                with worker.running() as running:
                    meter = CpuMeter(running.pid)
                    rate = asyncio.run(end_to_end(url, worker.queue, prefix, n, width, size, meter))
                record(measurement, broker, prefix, rate, meter)
                problems = log_problems(worker.log())
                if problems:
                    print(f"    {len(problems)} log lines to look at in {worker.log_path}:")
                    for line in problems[:5]:
                        print(f"      {line[:200]}")
    return rows


def report(rows: list[Row], n: int, width: int, size: int, latency_ms: int) -> None:
    raw = next(r.rate for r in rows if r.measurement == RAW)
    prefork = {r.broker: r.rate for r in rows if r.measurement == PLAIN_PREFORK}
    latency = f"S3 +{latency_ms} ms"
    print()
    print(
        f"{n} uploads of {size} B, {width} in flight, one moto server, "
        f"S3 latency +{latency_ms} ms per request"
        + (" (delay proxy)" if latency_ms else " (moto direct, no added latency)")
    )
    print()
    print(
        f"| measurement | broker | uploads/s ({latency}) | vs raw aiobotocore "
        "| vs plain prefork | landed | machine CPU busy | caller CPU ms/upload "
        "| worker CPU ms/upload |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        vs_plain = f"{r.rate / prefork[r.broker]:.2f}x" if r.broker in prefork else "-"
        print(
            f"| {r.measurement} | {r.broker} | {r.rate:,.0f} | {r.rate / raw:.0%} "
            f"| {vs_plain} | {r.landed} | {r.cpu_columns()} |"
        )
    print()
    for r in rows:
        if r.measurement != PUSHER:
            continue
        share, factor = r.rate / raw, r.rate / prefork[r.broker]
        print(
            f"- {r.broker}, {latency}: "
            f">= 90% of raw aiobotocore: {'MET' if share >= 0.9 else 'NOT MET'} "
            f"({r.rate:,.0f} vs {raw:,.0f} uploads/s = {share:.0%}); "
            f">= 2x plain prefork boto3 worker: {'MET' if factor >= 2 else 'NOT MET'} "
            f"({r.rate:,.0f} vs {prefork[r.broker]:,.0f} uploads/s = {factor:.2f}x)"
        )
    print(
        "\nCPU columns: share of the machine's CPUs busy (any process: moto, the delay proxy, "
        "brokers included), and CPU time per upload of the calling process and of the worker "
        "process tree. When the machine is near 100%, rates measure CPU cost, not waiting."
    )
    print(f"\nworker and moto logs: {log_dir()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--uploads", type=int, default=1000, help="uploads per measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="uploads in flight")
    parser.add_argument("--size", type=int, default=1024, help="bytes per object")
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument(
        "--s3-latency-ms",
        type=int,
        default=0,
        help="delay added to every S3 request by a loopback proxy (0: moto direct)",
    )
    args = parser.parse_args()
    brokers = args.brokers.split(",")
    unknown = set(brokers) - set(BROKERS)
    if unknown:
        parser.error(f"unknown broker(s) {', '.join(sorted(unknown))}; known: redis, amqp")
    if args.s3_latency_ms < 0:
        parser.error("--s3-latency-ms must be >= 0")
    rows = run(brokers, args.uploads, args.concurrency, args.size, args.s3_latency_ms)
    report(rows, args.uploads, args.concurrency, args.size, args.s3_latency_ms)


if __name__ == "__main__":
    main()
