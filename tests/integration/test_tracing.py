"""Traces: one span per request, under the caller's W3C traceparent (through Envoy), with
children for prepare, queue, engine and the durable writes; no prompt text in any span."""

import openai
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from parley import tracing

from tests.support.stack import scripted_stack

pytestmark = pytest.mark.integration

MODEL = "scripted"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


@pytest.fixture(scope="module")
async def traced(tmp_path_factory):
    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter)
    try:
        async with scripted_stack(tmp_path_factory, "trace") as running:
            yield running, exporter
    finally:
        tracing.tracer = trace.get_tracer("parley")  # back to no-op for the other tests


async def test_a_create_is_one_span_under_the_callers_trace_with_its_steps(traced):
    stack, exporter = traced
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused",
                                default_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    response = await client.responses.create(model=MODEL, input="a secret prompt")
    spans = exporter.get_finished_spans()
    [rpc] = [span for span in spans if span.name == "parley.rpc"
             and span.attributes["rpc.method"] == "HttpCreateResponseChunked"]
    assert format(rpc.context.trace_id, "032x") == TRACE_ID and format(rpc.parent.span_id, "016x") == PARENT_ID
    assert rpc.attributes["parley.project"] == "default" and rpc.attributes["http.response.status_code"] == 200
    children = {span.name: span for span in spans if span.parent is not None
                and span.parent.span_id == rpc.context.span_id}
    assert {"parley.prepare", "parley.queue", "parley.engine", "parley.store.ack"} <= set(children)
    assert children["parley.prepare"].attributes["parley.response_id"] == response.id
    assert children["parley.engine"].attributes["parley.output_tokens"] == response.usage.output_tokens
    for span in spans:
        assert "secret" not in str(dict(span.attributes or {}))
