"""OpenTelemetry traces, off unless the standard OTEL_* settings turn them on.

`OTEL_TRACES_EXPORTER=otlp` (with `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
OTLP over HTTP) or `console` turns tracing on; `OTEL_SDK_DISABLED=true` keeps it off. Off, every
span is OpenTelemetry's no-op: nothing is recorded or sent.

One span per RPC (`parley.rpc`, a child of the W3C `traceparent` the request carries, which
Envoy passes on), with children for the create's steps: `parley.prepare`, `parley.queue` (waiting
for a generation slot), `parley.engine` (first to last token) and `parley.store.ack` (waiting for
a durable write). Spans carry ids, counts and statuses, never prompt or output text.

Spans are started with an explicit parent and ended explicitly, never made "current" inside the
pipeline's async generators: those are resumed by other tasks, where attaching a context and
detaching it later is not safe.
"""

from __future__ import annotations

import contextvars
import os

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from parley.log import get_logger

log = get_logger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
tracer = trace.get_tracer("parley")
# The RPC span of the request this task serves (set by the transport's boundary; tasks the
# request starts inherit it).
_RPC_SPAN: contextvars.ContextVar[trace.Span | None] = contextvars.ContextVar("parley_rpc_span", default=None)


def configure(service_name: str = "parley", exporter=None) -> bool:
    """Install a tracer provider if the OTEL_* settings (or a test's `exporter`) ask for one."""
    global tracer
    wanted = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter is None and (os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or wanted in ("", "none")):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                         service_name)}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif wanted == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif wanted == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER must be otlp, console or none, got {wanted!r}")
    tracer = provider.get_tracer("parley")
    log.info("tracing.on", exporter=wanted or "test")
    return True


def start_rpc(name: str, metadata, **attributes) -> trace.Span:
    """The span of one RPC, under the caller's trace context; it becomes this task's RPC span."""
    span = tracer.start_span("parley.rpc", context=incoming(metadata), kind=trace.SpanKind.SERVER,
                             attributes={"rpc.method": name, **attributes})
    _RPC_SPAN.set(span)
    return span


def rpc_span() -> trace.Span | None:
    return _RPC_SPAN.get()


def incoming(metadata) -> otel_context.Context:
    """The trace context a request's metadata carries (`traceparent`), or an empty one."""
    return _PROPAGATOR.extract({key: value for key, value in metadata or () if isinstance(value, str)})


def child(name: str, parent: trace.Span | None, **attributes) -> trace.Span:
    """A span under `parent` (no-op when tracing is off or there is no parent)."""
    if parent is None or not parent.is_recording():
        return trace.INVALID_SPAN
    return tracer.start_span(name, context=trace.set_span_in_context(parent), attributes=attributes or None)
