"""The typed gRPC API with a generated stub, on the real model (no Envoy in between)."""

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from parley.codec import typed
from parley.v1 import responses_pb2, service_pb2, service_pb2_grpc

from tests.integration.conftest import MODEL
from tests.support.streams import check_stream, event_types, text_message_sequence

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture(scope="module")
async def stub(stack):
    async with stack.channel() as channel:
        yield service_pb2_grpc.ResponsesStub(channel)


def request(**fields) -> responses_pb2.CreateResponseRequest:
    return typed.from_json({"model": MODEL, "max_output_tokens": 24, "temperature": 0, **fields},
                           responses_pb2.CreateResponseRequest())


async def test_create_get_list_delete(stub):
    response = await stub.CreateResponse(request(input="Hello there", metadata={"via": "grpc"},
                                                 instructions="Be brief."))
    assert response.id.startswith("resp_") and response.status in ("completed", "incomplete")
    assert response.output[0].message.content.output_parts.items[0].output_text.text
    assert response.metadata["via"] == "grpc" and response.instructions.text == "Be brief."
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    fetched = await stub.GetResponse(service_pb2.GetResponseRequest(response_id=response.id))
    assert fetched == response
    items = await stub.ListInputItems(service_pb2.ListInputItemsRequest(response_id=response.id))
    assert items.data[0].message.content.parts.items[0].input_text.text == "Hello there"
    deleted = await stub.DeleteResponse(service_pb2.DeleteResponseRequest(response_id=response.id))
    assert deleted.deleted and deleted.id == response.id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetResponse(service_pb2.GetResponseRequest(response_id=response.id))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_stream_typed_events(stub):
    events = [typed.to_json(event) async for event in stub.StreamCreateResponse(request(input="Count to three."))]
    deltas = sum(e["type"] == "response.output_text.delta" for e in events)
    assert event_types(events) == text_message_sequence(deltas, events[-1]["type"])
    check_stream(events)


async def test_list_models(stub):
    models = await stub.ListModels(service_pb2.ListModelsRequest())
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.parametrize("fields,code,param", [
    ({"model": "nope", "input": "x"}, grpc.StatusCode.NOT_FOUND, "model"),
    ({"input": "x", "temperature": 3}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"input": "x", "top_logprobs": 21}, grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs"),
    ({"input": "x", "previous_response_id": "resp_gone"}, grpc.StatusCode.INVALID_ARGUMENT, "previous_response_id"),
])
async def test_errors_are_canonical_codes_with_rich_details(stub, fields, code, param):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateResponse(request(**fields))
    error = info.value
    assert error.code() == code
    trailers = dict(error.trailing_metadata())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    detail = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(detail)
    assert detail.domain == "parley.dev" and detail.metadata["param"] == param
    assert '"param":"%s"' % param in trailers["x-openai-error"]


async def test_health_and_reflection(stack):
    async with stack.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "parley.v1.Responses"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for reply in replies for s in reply.list_services_response.service}
        assert {"parley.v1.Responses", "parley.v1.ResponsesHttp", "grpc.health.v1.Health"} <= names


async def test_the_deprecated_stream_rpc_still_streams(stub):
    """StreamResponse was renamed StreamCreateResponse; clients built before keep working."""
    events = [typed.to_json(event) async for event in stub.StreamResponse(request(input="Hi.", max_output_tokens=16))]
    assert events[0]["type"] == "response.created" and events[-1]["type"] in ("response.completed",
                                                                             "response.incomplete")
    check_stream(events)


async def test_count_input_tokens_and_compact_over_the_typed_api(stub, client):
    count = await stub.CountInputTokens(typed.from_json({"input": "Hello there", "instructions": "Be brief."},
                                                        service_pb2.CountInputTokensRequest()))
    response = await client.responses.create(model=MODEL, input="Hello there", instructions="Be brief.",
                                             max_output_tokens=16)
    assert count.object == "response.input_tokens" and count.input_tokens == response.usage.input_tokens
    compacted = await stub.CompactResponse(typed.from_json(
        {"model": MODEL, "input": [{"role": "user", "content": "The code is 4471."}]},
        service_pb2.CompactResponseRequest()))
    assert compacted.object == "response.compaction" and compacted.id.startswith("resp_")
    assert [item.WhichOneof("type") for item in compacted.output] == ["message", "compaction"]
    assert compacted.usage.output_tokens > 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CountInputTokens(service_pb2.CountInputTokensRequest(model="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_session_runs_lanes_and_reports_errors_in_typed_messages(stub):
    """The bidirectional Session RPC: two creates on one lane in order, a continuation, a bad one."""
    requests: asyncio.Queue = asyncio.Queue()

    async def feed():
        while (message := await requests.get()) is not None:
            yield message

    call = stub.Session(feed())
    events = aiter(call)
    requests.put_nowait(service_pb2.SessionRequest(stream_id="lane_1", create=request(input="Say hi.")))
    first = []
    async for message in events:
        assert message.stream_id == "lane_1" and message.WhichOneof("kind") == "event"
        first.append(typed.to_json(message.event))
        if first[-1]["type"] in ("response.completed", "response.incomplete"):
            break
    response = check_stream(first)
    requests.put_nowait(service_pb2.SessionRequest(create=request(input="Again.", previous_response_id=response["id"])))
    requests.put_nowait(service_pb2.SessionRequest(create=request(input="x", temperature=5)))
    second = []
    async for message in events:
        assert not message.HasField("stream_id")
        if message.WhichOneof("kind") == "error":
            error = message.error
            break
        second.append(typed.to_json(message.event))
    assert check_stream(second)["previous_response_id"] == response["id"]
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", "temperature")
    requests.put_nowait(None)  # half-close: the session ends once its lanes are done
    assert [message async for message in events] == []
    assert await call.code() == grpc.StatusCode.OK
