"""Tool calls, reasoning, structured outputs and logprobs through the pipeline (scripted engine)."""

import base64
import json

import pytest
from parley.engine.base import Constraint
from parley.errors import ApiError
from parley.service.sealing import Sealer

from tests.fakes.engines import ScriptedEngine
from tests.support.golden import assert_golden
from tests.support.pipeline import service_on, stream
from tests.support.streams import check_stream, event_types

MODEL = "scripted"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
CALL = ['<tool_call>\n{"name": "get_weather", "arguments": ', '{"city": ', '"Paris"}', "}\n</tool_call>"]


@pytest.fixture
async def service(tmp_path):
    async with service_on(tmp_path / "t.sqlite3", ScriptedEngine(model_id=MODEL, script=CALL),
                          sealer=Sealer(b"k" * 32)) as service:
        yield service


async def test_a_tool_call_streams_in_order_and_matches_the_final_item(service):
    events = await stream(service, input="weather?", tools=[WEATHER], tool_choice="required")
    assert event_types(events) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    response = check_stream(events)
    [call] = response["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert deltas == call["arguments"] == '{"city": "Paris"}'
    assert response["tools"] == [{**WEATHER, "strict": True}] and response["tool_choice"] == "required"
    assert_golden("stream_tool_call", events)


async def test_the_engine_gets_the_constraint_the_request_implies(service):
    await stream(service, input="x", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
                 parallel_tool_calls=False)
    constraint = service.engine.last_params.constraint
    assert constraint == Constraint("tools", tools=(("get_weather", WEATHER["parameters"]),), mode="required",
                                    parallel=False)
    service.engine.script = CALL  # under `none` even call-shaped text is only text
    events = await stream(service, input="x", tools=[WEATHER], tool_choice="none")
    # The tools stay in the prompt (its prefix is the same as under `auto`); the grammar forbids a call.
    assert service.engine.last_params.constraint == Constraint("tools", mode="none")
    assert any("<tools>" in message.content for message in service.engine.prompts[-1])
    assert [item["type"] for item in check_stream(events)["output"]] == ["message"]
    await stream(service, input="x", text={"format": {"type": "json_object"}})
    assert service.engine.last_params.constraint == Constraint("json_object")
    await stream(service, input="x")
    assert service.engine.last_params.constraint is None


async def test_parallel_calls_become_separate_items(service):
    second = ['\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>']
    service.engine.script = CALL + second
    events = await stream(service, input="x", tools=[WEATHER], tool_choice="required")
    response = check_stream(events)
    assert [json.loads(i["arguments"])["city"] for i in response["output"]] == ["Paris", "Rome"]
    assert len({i["call_id"] for i in response["output"]}) == 2


async def test_tools_are_shown_to_the_model_and_round_trip_outputs(service):
    first = await service.create("default", {"model": MODEL, "input": "weather?", "tools": [WEATHER]})
    [call] = first["output"]
    system = service.engine.prompts[-1][0]
    assert system.role == "developer" and "<tools>" in system.content and "get_weather" in system.content
    service.engine.script = ["It is sunny."]
    second = await service.create("default", {"model": MODEL, "previous_response_id": first["id"], "tools": [WEATHER],
                                   "input": [{"type": "function_call_output", "call_id": call["call_id"],
                                              "output": "sunny, 21C"}]})
    assert second["output"][0]["content"][0]["text"] == "It is sunny."
    prompt = service.engine.prompts[-1]
    assert prompt[-2].role == "assistant" and '"name": "get_weather"' in prompt[-2].content
    assert prompt[-1].role == "user" and "<tool_response>\nsunny, 21C\n</tool_response>" == prompt[-1].content
    # Stateless: the call item itself in the input works as well.
    third = await service.create("default", {"model": MODEL, "tools": [WEATHER], "input": [
        {"type": "function_call", "call_id": "call_x", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_x", "output": "cold"}]})
    assert third["status"] == "completed"


async def test_an_output_for_an_unknown_call_is_400(service):
    with pytest.raises(ApiError) as info:
        await service.prepare("default", {"model": MODEL, "input": [{"type": "function_call_output", "call_id": "call_nope",
                                                          "output": "x"}]})
    assert (info.value.kind.http_status, info.value.code) == (400, "invalid_call_id")


async def test_reasoning_becomes_a_reasoning_item_and_is_counted(service):
    service.engine.reasoning_format = "think"
    service.engine.script = ["<think>", "Two plus", " two.", "</think>", "\n", "Four."]
    events = await stream(service, input="2+2?")
    assert event_types(events)[2:] == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    response = check_stream(events)
    reasoning, message = response["output"]
    assert reasoning["id"].startswith("rs_") and reasoning["content"] == [{"type": "reasoning_text",
                                                                          "text": "Two plus two."}]
    assert message["content"][0]["text"] == "Four."
    assert response["usage"]["output_tokens_details"]["reasoning_tokens"] == 4  # <think>, 2 texts, </think>


async def test_encrypted_reasoning_round_trips_statelessly_and_rejects_tampering(service):
    service.engine.reasoning_format = "think"
    service.engine.script = ["<think>", "secret thoughts", "</think>", "Done."]
    first = await service.create("default", {"model": MODEL, "input": "go", "store": False,
                                  "include": ["reasoning.encrypted_content"]})
    reasoning = first["output"][0]
    assert reasoning["encrypted_content"] and "secret" not in reasoning["encrypted_content"]
    returned = {"type": "reasoning", "id": reasoning["id"], "summary": [],
                "encrypted_content": reasoning["encrypted_content"]}
    second = await service.create("default", {"model": MODEL, "store": False, "input": [
        {"role": "user", "content": "go"}, returned, {"role": "user", "content": "again"}]})
    assert second["status"] == "completed"
    raw = bytearray(base64.urlsafe_b64decode(reasoning["encrypted_content"]))
    raw[-1] ^= 1
    tampered = {**returned, "encrypted_content": base64.urlsafe_b64encode(bytes(raw)).decode()}
    with pytest.raises(ApiError) as info:
        await service.create("default", {"model": MODEL, "store": False, "input": [tampered]})
    assert info.value.code == "invalid_encrypted_content" and info.value.param == "input[0].encrypted_content"


async def test_logprobs_only_when_included(service):
    service.engine.script = ["Hel", "lo"]
    events = await stream(service, input="x", include=["message.output_text.logprobs"], top_logprobs=2)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [len(d["logprobs"]) for d in deltas] == [1, 1]
    assert deltas[0]["logprobs"][0]["token"] == "Hel" and len(deltas[0]["logprobs"][0]["top_logprobs"]) == 2
    part = check_stream(events)["output"][0]["content"][0]
    assert [lp["token"] for lp in part["logprobs"]] == ["Hel", "lo"] and part["logprobs"][0]["bytes"] == list(b"Hel")
    plain = await stream(service, input="x", top_logprobs=2)
    assert all(e["logprobs"] == [] for e in plain if e["type"] == "response.output_text.delta")
    assert service.engine.last_params.top_logprobs is None


async def test_penalties_reach_the_engine_and_are_echoed(service):
    events = await stream(service, input="x", presence_penalty=0.5, frequency_penalty=-1)
    params = service.engine.last_params
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    response = check_stream(events)
    assert (response["presence_penalty"], response["frequency_penalty"]) == (0.5, -1.0)
    events = await stream(service, input="x")  # Open Responses requires both on every response
    assert (check_stream(events)["presence_penalty"], service.engine.last_params.frequency_penalty) == (0.0, 0.0)


async def test_a_namespaced_function_is_offered_by_its_qualified_name_and_called_back_with_its_namespace(service):
    namespace = {"type": "namespace", "name": "agents", "description": "Sub-agents.",
                 "tools": [{**WEATHER, "name": "spawn"}]}
    offline = {"type": "web_search", "external_web_access": False}
    service.engine.script = ['<tool_call>\n{"name": "agents.spawn", "arguments": {"city": "Paris"}}\n</tool_call>']
    events = await stream(service, input="x", tools=[namespace, offline], tool_choice="required")
    response = check_stream(events)
    call = response["output"][0]
    assert (call["type"], call["name"], call["namespace"]) == ("function_call", "spawn", "agents")
    assert response["tools"][0]["tools"][0]["name"] == "spawn" and response["tools"][1] == offline
    offered = service.engine.prompts[-1][0].content
    assert '"name": "agents.spawn"' in offered and "web_search" not in offered
    assert service.engine.last_params.constraint.tools[0][0] == "agents.spawn"
    # Sent back, the call is rendered as the model wrote it.
    service.engine.script = ["Sunny."]
    await stream(service, input=[call, {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny",
                                        "name": "spawn", "namespace": "agents"}], tools=[namespace])
    assert '"name": "agents.spawn"' in service.engine.prompts[-1][1].content


PATCH_TOOL = {"type": "custom", "name": "apply_patch", "description": "Apply a patch.",
              "format": {"type": "text"}}


async def test_a_custom_tool_call_streams_its_free_form_input(service):
    raw = '{"input": "*** Begin Patch\\n+say \\"hi\\" \\u00e9\\n*** End"}'
    pieces = [raw[i:i + 3] for i in range(0, len(raw), 3)]  # splits inside escapes too
    service.engine.script = ['<tool_call>\n{"name": "apply_patch", "arguments": ', *pieces, "}\n</tool_call>"]
    events = await stream(service, input="Patch it.", tools=[PATCH_TOOL], tool_choice={"type": "custom",
                                                                                        "name": "apply_patch"})
    response = check_stream(events)
    call = response["output"][0]
    expected = '*** Begin Patch\n+say "hi" \u00e9\n*** End'
    assert (call["type"], call["name"], call["input"]) == ("custom_tool_call", "apply_patch", expected)
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert "".join(deltas) == expected and len(deltas) > 3
    done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
    assert done["input"] == expected and response["tool_choice"] == {"type": "custom", "name": "apply_patch"}
    assert service.engine.last_params.constraint.mode == "required"
    # Its output goes back; the prompt shows the call as the model wrote it, then the result.
    service.engine.script = ["Patched."]
    await stream(service, input=[call, {"type": "custom_tool_call_output", "call_id": call["call_id"],
                                        "output": "applied"}], tools=[PATCH_TOOL])
    prompt = [m.content for m in service.engine.prompts[-1]]
    assert '"name": "apply_patch"' in prompt[1] and "<tool_response>\napplied" in prompt[2]


@pytest.mark.parametrize("tool, param", [
    ({**PATCH_TOOL, "format": {"type": "grammar", "syntax": "lark", "definition": "start: x"}},
     "tools[0].format.syntax"),
    ({**PATCH_TOOL, "format": {"type": "yaml"}}, "tools[0].format.type"),
    ({**PATCH_TOOL, "defer_loading": True}, "tools[0].defer_loading"),
])
async def test_a_custom_tool_this_server_cannot_honour_is_refused_by_name(service, tool, param):
    from parley.errors import ApiError

    with pytest.raises(ApiError) as caught:
        await service.create("default", {"model": service.engine.model_id, "input": "x", "tools": [tool]})
    assert caught.value.param == param


def test_the_custom_input_decoder_decodes_at_every_split():
    from parley.service.tools import CustomInputDecoder

    raw = '{"input": "a\\"b\\\\c\\n\\u00e9\\ud83d\\ude00z"}'
    expected = 'a"b\\c\n\u00e9\U0001F600z'
    for size in range(1, 8):
        decoder = CustomInputDecoder()
        text = "".join(decoder.feed(raw[i:i + size]) for i in range(0, len(raw), size))
        assert text == decoder.value == expected


async def test_the_engine_caches_prompts_per_project(service):
    await stream(service, input="x")
    assert service.engine.last_params.cache_scope == "default"
    prepared = await service.prepare("acme", {"model": MODEL, "stream": True, "input": "x"})
    async for _ in service.run(prepared):
        pass
    assert service.engine.last_params.cache_scope == "acme"
