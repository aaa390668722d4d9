"""Traces: one span per request, under the caller's W3C traceparent (through Envoy), with
children for prepare, queue, engine and the durable writes; no prompt text in any span."""

import openai
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from parley import tracing

from tests.support.stack import scripted_stack
from tests.support.websocket import open_socket

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


async def test_each_websocket_turn_is_a_span_under_the_handshakes_trace(traced):
    stack, exporter = traced
    async with open_socket(stack.base_url, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}) as socket:
        await socket.turn(model=MODEL, input="a secret prompt", stream_id="lane_1")
        await socket.turn(model=MODEL, input="x", temperature=9)
    turns = [span for span in exporter.get_finished_spans() if span.name == "parley.rpc"
             and span.attributes["rpc.method"] == "Session/response.create"]
    assert [span.attributes["parley.outcome"] for span in turns[-2:]] == ["response.completed", "refused"]
    assert turns[-2].attributes["parley.stream_id"] == "lane_1"
    for span in turns[-2:]:
        assert format(span.context.trace_id, "032x") == TRACE_ID and format(span.parent.span_id, "016x") == PARENT_ID
    children = [span.name for span in exporter.get_finished_spans() if span.parent is not None
                and span.parent.span_id == turns[-2].context.span_id]
    assert children, "the turn's steps are not under its span"
    assert "secret" not in str([span.attributes for span in exporter.get_finished_spans()])
