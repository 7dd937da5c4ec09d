"""A service calling the ecosystem worker inside a trace of its own, on both paths.

``python -m tests.ecosystem.caller <queue>`` with ``CB_ECO_TOOL``, ``CB_ECO_OUT`` and
the ``CELERYBRIDGE_*`` settings in the environment. For each path (fast, kombu) and
each contract it opens a trace, delegates, awaits the result and prints one JSON line:
the path, the task, the caller's trace id and what the task body saw.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from celerybridge import Bridge

from . import bindings, tracing


@contextmanager
def caller_trace(tool: str, name: str) -> Iterator[str]:
    """A trace started by the caller (a request handler would have one); yields its id."""
    if tool == "otel":
        from opentelemetry import trace

        with trace.get_tracer("caller").start_as_current_span(name) as span:
            yield f"{span.get_span_context().trace_id:032x}"
    else:
        import sentry_sdk

        with sentry_sdk.start_transaction(name=name, op="http.server") as transaction:
            yield transaction.trace_id


async def main(queue: str) -> None:
    tool = tracing.set_up()
    for fast_path in (True, False):
        async with Bridge(fast_path=fast_path) as bridge:
            for stub in bindings.STUBS:
                with caller_trace(tool, f"call {stub.name}") as trace_id:
                    handle = await bridge.send(stub.with_options(queue=queue), (), {})
                seen = await handle.result(timeout=30)
                path = "fast" if fast_path else "kombu"
                line = {"path": path, "task": stub.name, "trace_id": trace_id, "body": seen}
                print(json.dumps(line))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
