"""Tracing set up the way a service sets it up, exporting to a file instead of a collector.

``CB_ECO_TOOL`` picks the tool (``otel`` or ``sentry``), ``CB_ECO_OUT`` the file: one
JSON line per finished OpenTelemetry span, or per Sentry transaction, so a test reads
what a real exporter or transport would have sent. Nothing goes over the network.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

_lock = threading.Lock()


def _write(record: dict[str, Any]) -> None:
    with _lock, open(os.environ["CB_ECO_OUT"], "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


def set_up() -> str:
    """Instrument this process with the tool ``CB_ECO_TOOL`` names; returns its name."""
    tool = os.environ["CB_ECO_TOOL"]
    if tool == "otel":
        _otel()
    elif tool == "sentry":
        _sentry()
    else:
        raise ValueError(f"unknown CB_ECO_TOOL {tool!r}")
    return tool


def _otel() -> None:
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class FileExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            for span in spans:
                context = span.get_span_context()
                assert context is not None
                _write(
                    {
                        "name": span.name,
                        "trace_id": f"{context.trace_id:032x}",
                        "span_id": f"{context.span_id:016x}",
                        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                    }
                )
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()


def _sentry() -> None:
    import sentry_sdk
    from sentry_sdk.envelope import Envelope
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.transport import Transport

    class CapturingTransport(Transport):
        def capture_envelope(self, envelope: Envelope) -> None:
            for item in envelope.items:
                if item.type == "transaction" and item.payload.json is not None:
                    event = item.payload.json
                    trace = event["contexts"]["trace"]
                    _write(
                        {
                            "name": event.get("transaction"),
                            "trace_id": trace["trace_id"],
                            "span_id": trace["span_id"],
                            "parent_id": trace.get("parent_span_id"),
                            # The transaction's own spans (the integration opens one
                            # around the task's body).
                            "children": [span["span_id"] for span in event.get("spans", [])],
                        }
                    )

    sentry_sdk.init(
        dsn="https://public@sentry.invalid/1",
        transport=CapturingTransport,
        integrations=[CeleryIntegration()],
        default_integrations=False,
        auto_enabling_integrations=False,
        traces_sample_rate=1.0,
    )


def current() -> dict[str, str]:
    """The trace id and span id current here, as the tool in use sees them."""
    if os.environ["CB_ECO_TOOL"] == "otel":
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
    import sentry_sdk

    span = sentry_sdk.get_current_span()
    if span is None:
        return {"trace_id": "", "span_id": ""}
    return {"trace_id": span.trace_id, "span_id": span.span_id}
