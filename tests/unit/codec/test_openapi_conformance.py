"""What the server writes, validated against the official OpenAPI spec (skipped without it)."""

import json

import pytest
from parley.errors import invalid, not_found
from parley.service.sealing import Sealer

from tests.fakes.engines import ScriptedEngine
from tests.support import openapi
from tests.support.golden import GOLDEN_DIR
from tests.support.pipeline import service_on, stream

EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
    "response.queued": "ResponseQueuedEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.custom_tool_call_input.delta": "ResponseCustomToolCallInputDeltaEvent",
    "response.custom_tool_call_input.done": "ResponseCustomToolCallInputDoneEvent",
}


@pytest.fixture(autouse=True)
def _spec():
    openapi.require_spec()


def test_response_document():
    openapi.validate("Response", json.loads((GOLDEN_DIR / "response_completed.json").read_text()))


@pytest.mark.parametrize("golden", ["stream_events", "stream_tool_call"])
def test_every_streamed_event_matches_its_schema_and_the_union(golden):
    for event in json.loads((GOLDEN_DIR / f"{golden}.json").read_text()):
        openapi.validate(EVENT_SCHEMAS[event["type"]], event)
        openapi.validate("ResponseStreamEvent", event)


async def test_incomplete_and_failed_responses(tmp_path):
    engine = ScriptedEngine(model_id="m", script=["w"] * 30)
    async with service_on(tmp_path / "s.sqlite3", engine) as service:
        for fail_after in (None, 2):
            engine.fail_after = fail_after
            events = await stream(service, input="x", max_output_tokens=16)
            for event in events:
                openapi.validate(EVENT_SCHEMAS[event["type"]], event)
            openapi.validate("Response", events[-1]["response"])


def test_errors_item_list_delete_and_models():
    for error in (invalid("bad", "temperature", "invalid_value"), not_found("gone", "response_id")):
        openapi.validate("ErrorResponse", error.to_openai())
    openapi.validate("ResponseErrorEvent", {"type": "error", "code": "server_error", "message": "m", "param": None,
                                            "sequence_number": 4})
    page = {"object": "list", "data": [
        {"type": "message", "id": "msg_1", "role": "user", "status": "completed",
         "content": [{"type": "input_text", "text": "x"}]},
        {"type": "message", "id": "msg_2", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "y", "annotations": [], "logprobs": []}]}],
        "first_id": "msg_1", "last_id": "msg_2", "has_more": False}
    openapi.validate("ResponseItemList", page)
    openapi.validate("ListModelsResponse", {"object": "list", "data": [
        {"id": "m", "object": "model", "created": 1, "owned_by": "parley"}]})


def test_the_checker_can_fail():
    with pytest.raises(AssertionError):
        openapi.validate("Response", {"id": "resp_1", "object": "not-a-response"})


async def test_reasoning_logprobs_and_tool_events(tmp_path):
    engine = ScriptedEngine(model_id="m", script=["<think>", "hmm", "</think>", "Yes."])
    engine.reasoning_format = "think"
    async with service_on(tmp_path / "r.sqlite3", engine, sealer=Sealer(b"k" * 32)) as service:
        events = await stream(service, input="x", top_logprobs=2,
                              include=["message.output_text.logprobs", "reasoning.encrypted_content"])
    for event in events:
        openapi.validate(EVENT_SCHEMAS[event["type"]], event)
    openapi.validate("Response", events[-1]["response"])


async def test_namespaced_custom_and_compaction_outputs_match_both_specs(tmp_path):
    """The items and events that issue 14 added, against OpenAI's spec; the compaction run's
    against Open Responses' too (its Response knows function tools only: namespaces, custom tools
    and web search are OpenAI's)."""
    namespace = {"type": "namespace", "name": "agents", "description": "Sub-agents.", "tools": [
        {"type": "function", "name": "spawn", "parameters": {"type": "object", "properties": {}}}]}
    custom = {"type": "custom", "name": "apply_patch", "format": {"type": "text"}}
    engine = ScriptedEngine(model_id="m", script=[
        '<tool_call>\n{"name": "agents.spawn", "arguments": {}}\n</tool_call>\n',
        '<tool_call>\n{"name": "apply_patch", "arguments": {"input": "+ line"}}\n</tool_call>'])
    async with service_on(tmp_path / "n.sqlite3", engine, sealer=Sealer(b"k" * 32)) as service:
        events = await stream(service, input="x", tools=[namespace, custom,
                                                         {"type": "web_search", "external_web_access": False}])
        engine.script = ["A summary."]
        compacted = await stream(service, input=[{"role": "user", "content": "x"}, {"type": "compaction_trigger"}])
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["function_call", "custom_tool_call"]
    for event in events + compacted:
        openapi.validate(EVENT_SCHEMAS[event["type"]], event)
    for event in compacted:
        other = openapi.open_responses_event_schema(event["type"])
        if other is not None and openapi.OPEN_RESPONSES_PATH.is_file():
            openapi.validate_open_responses(other, event)
    openapi.validate("Response", events[-1]["response"])
    openapi.validate("Response", compacted[-1]["response"])
