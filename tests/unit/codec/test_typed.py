"""The typed mirror: every JSON shape the service emits survives JSON -> proto -> JSON."""

import json

import pytest
from parley.codec import typed
from parley.errors import ApiError
from parley.v1 import events_pb2, responses_pb2, service_pb2

from tests.support.golden import GOLDEN_DIR


def without_nulls(node):
    if isinstance(node, dict):
        return {k: without_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [without_nulls(v) for v in node]
    return node


def roundtrip(document, message):
    return typed.to_json(typed.from_json(document, message))


def test_golden_response_roundtrips():
    document = json.loads((GOLDEN_DIR / "response_completed.json").read_text())
    assert roundtrip(document, responses_pb2.Response()) == without_nulls(document)


def test_every_golden_event_roundtrips():
    for event in json.loads((GOLDEN_DIR / "stream_events.json").read_text()):
        assert roundtrip(event, events_pb2.ResponseStreamEvent()) == without_nulls(event), event["type"]


def test_event_variant_carries_the_openai_type():
    message = typed.from_json({"type": "response.output_text.delta", "item_id": "m", "output_index": 0,
                               "content_index": 0, "delta": "x", "logprobs": [], "sequence_number": 7},
                              events_pb2.ResponseStreamEvent())
    assert message.WhichOneof("type") == "output_text_delta"
    assert message.output_text_delta.sequence_number == 7


def test_create_request_unions():
    request = typed.from_json({
        "model": "m",
        "input": [{"role": "user", "content": "hi"},
                  {"type": "message", "role": "assistant",
                   "content": [{"type": "output_text", "text": "yo", "annotations": [], "logprobs": []}]},
                  {"type": "function_call_output", "call_id": "call_1", "output": "42"}],
        "tool_choice": {"type": "function", "name": "f"},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True},
                  {"type": "web_search", "search_context_size": "low"}],
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
    }, responses_pb2.CreateResponseRequest())
    assert request.input.items.items[0].message.content.text == "hi"
    assert request.input.items.items[1].message.content.output_parts.items[0].output_text.text == "yo"
    assert request.tool_choice.object.function.name == "f"
    assert request.tools[1].web_search.fields["search_context_size"] == "low"
    back = typed.to_json(request)
    assert back["input"][0] == {"type": "message", "role": "user", "content": "hi"}
    assert back["tools"][1] == {"type": "web_search", "search_context_size": "low"}
    assert back["tool_choice"] == {"type": "function", "name": "f"}


def test_string_input_and_string_tool_choice():
    request = typed.from_json({"model": "m", "input": "hello", "tool_choice": "none"},
                              responses_pb2.CreateResponseRequest())
    assert request.input.text == "hello" and request.tool_choice.mode == "none"
    assert typed.to_json(request)["input"] == "hello"


def test_optional_scalars_keep_presence():
    request = typed.from_json({"model": "m", "temperature": 0}, responses_pb2.CreateResponseRequest())
    assert request.HasField("temperature") and not request.HasField("top_p")
    assert typed.to_json(request)["temperature"] == 0


def test_delete_and_list_replies():
    assert roundtrip({"id": "resp_1", "object": "response", "deleted": True},
                     service_pb2.DeleteResponseResponse()) == {"id": "resp_1", "object": "response", "deleted": True}
    page = {"object": "list", "data": [{"type": "message", "id": "msg_1", "role": "user", "status": "completed",
                                        "content": [{"type": "input_text", "text": "x"}]}],
            "first_id": "msg_1", "last_id": "msg_1", "has_more": False}
    assert roundtrip(page, service_pb2.ListInputItemsResponse()) == page


@pytest.mark.parametrize("document,param", [
    ({"model": "m", "bogus": 1}, "bogus"),
    ({"model": "m", "input": [{"type": "teleport"}]}, "input[0].type"),
    ({"model": "m", "input": 5}, "input"),
    ({"model": "m", "temperature": "hot"}, "temperature"),
])
def test_json_without_a_typed_home_is_rejected_with_its_path(document, param):
    with pytest.raises(ApiError) as info:
        typed.from_json(document, responses_pb2.CreateResponseRequest())
    assert info.value.param == param
