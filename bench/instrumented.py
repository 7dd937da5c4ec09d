"""What tracing costs a publish: fast and kombu paths with and without instrumentation.

``python -m bench.instrumented`` measures fire-and-forget publish rates (1 KiB, one at a
time and ``WIDTH`` in flight, ``bench._publish.measure``) on Redis and RabbitMQ, for each
path, in three set-ups of the calling process:

- nothing connected to Celery's publish signals;
- OpenTelemetry: ``opentelemetry-sdk`` with ``opentelemetry-instrumentation-celery``
  (``CeleryInstrumentor().instrument()``, spans to an in-memory exporter): a producer
  span and a ``traceparent`` header per publish, from ``before_task_publish``;
- Sentry: ``sentry-sdk`` with its Celery integration, every trace sampled, calls made
  inside one transaction (a request handler's), envelopes dropped by the transport: a
  submit span and ``sentry-trace`` / ``baggage`` headers per publish.

Each measurement runs in a fresh process (instrumentation is process-wide); rounds are
interleaved and the best of each kept. Absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from functools import partial
from typing import Any

import anyio

from celerybridge import Bridge

from ._common import BROKERS, RESULT_BACKEND, ROOT, WIDTH, delete_queue, echo, new_queue, payload
from ._publish import measure

VARIANTS = ("none", "opentelemetry", "sentry")
LABELS = {
    "none": "no instrumentation",
    "opentelemetry": "OpenTelemetry Celery instrumentation",
    "sentry": "Sentry Celery integration, 100% traced",
}


def instrument(variant: str) -> Any:
    """Set this process up as ``variant`` says; returns a context to publish within."""
    if variant == "opentelemetry":
        from opentelemetry import trace
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument()
        return nullcontext()
    if variant == "sentry":
        import sentry_sdk
        from sentry_sdk.integrations.celery import CeleryIntegration
        from sentry_sdk.transport import Transport

        class Dropped(Transport):
            def capture_envelope(self, envelope: object) -> None:
                pass

        sentry_sdk.init(
            dsn="https://public@sentry.invalid/1",
            transport=Dropped,
            integrations=[CeleryIntegration()],
            default_integrations=False,
            traces_sample_rate=1.0,
        )
        return sentry_sdk.start_transaction(name="bench", op="http.server")
    return nullcontext()


async def rates(broker: str, fast_path: bool, variant: str, n: int) -> tuple[float, float]:
    """(sequential, ``WIDTH`` in flight) publishes/s in this process, set up as ``variant``."""
    within = instrument(variant)
    queue = new_queue("instrumented")
    broker_url = BROKERS[broker]
    try:
        async with Bridge(
            broker_url=broker_url, result_backend=RESULT_BACKEND, fast_path=fast_path
        ) as bridge:
            with within:
                seq, conc = await measure(
                    n, partial(bridge.send, echo.with_options(queue=queue), (payload(1024),), {})
                )
    finally:
        delete_queue(broker_url, queue)
    assert seq is not None
    assert conc is not None
    return seq, conc


def measure_in_child(broker: str, fast_path: bool, variant: str, n: int) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.instrumented", "--child", broker,
         "fast" if fast_path else "kombu", variant, "--n", str(n)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    seq, conc = json.loads(out.stdout.splitlines()[-1])
    return float(seq), float(conc)


def run(brokers: list[str], n: int, rounds: int) -> None:
    best: dict[tuple[str, bool, str], tuple[float, float]] = {}
    for _ in range(rounds):
        for broker in brokers:
            for fast_path in (True, False):
                for variant in VARIANTS:
                    key = (broker, fast_path, variant)
                    seq, conc = measure_in_child(broker, fast_path, variant, n)
                    old = best.get(key, (0.0, 0.0))
                    best[key] = (max(old[0], seq), max(old[1], conc))
    print(
        f"| broker | path | calling process | sequential (msg/s) | vs none | "
        f"{WIDTH} concurrent (msg/s) | vs none |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for broker in brokers:
        for fast_path in (True, False):
            path = "fast" if fast_path else "kombu"
            base = best[broker, fast_path, "none"]
            for variant in VARIANTS:
                seq, conc = best[broker, fast_path, variant]
                print(
                    f"| {broker} | {path} | {LABELS[variant]} | {seq:,.0f} | "
                    f"{seq / base[0]:.0%} | {conc:,.0f} | {conc / base[1]:.0%} |"
                )
    print(f"\n{n} publishes of 1 KiB per measurement, best of {rounds} interleaved rounds.")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="publishes per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument("--child", nargs=3, metavar=("BROKER", "PATH", "VARIANT"))
    args = parser.parse_args()
    if args.child:
        broker, path, variant = args.child
        print(json.dumps(anyio.run(rates, broker, path == "fast", variant, args.n)))
        return
    run(args.brokers.split(","), args.n, args.rounds)


if __name__ == "__main__":
    main()
