"""Fields of the Open Responses and OpenAI specs through Envoy, on the real model: each one
honoured (and shown to be), or refused with a 400 that names it."""

import httpx
import openai
import orjson
import pytest

from tests.integration.conftest import MODEL
from tests.support.openapi import validate
from tests.support.streams import check_stream

pytestmark = [pytest.mark.integration, pytest.mark.model]

TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}


async def _sse(stack, body: dict) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as http:
        reply = await http.post(f"{stack.base_url}/responses", json={"model": MODEL, "stream": True, **body})
    assert reply.status_code == 200, reply.text
    return [orjson.loads(line[6:]) for line in reply.content.split(b"\n")
            if line.startswith(b"data: ") and line != b"data: [DONE]"]


async def test_input_tokens_counts_what_the_same_create_uses(client):
    fields = {"input": "What is the weather in Paris?", "instructions": "Answer briefly.", "tools": [TOOL]}
    counted = await client.responses.input_tokens.count(model=MODEL, **fields)
    validate("TokenCountsResource", counted.model_dump())
    response = await client.responses.create(model=MODEL, max_output_tokens=16, temperature=0, **fields)
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == response.usage.input_tokens
    chained = await client.responses.input_tokens.count(model=MODEL, input="And tomorrow?",
                                                        previous_response_id=response.id, tools=[TOOL])
    alone = await client.responses.input_tokens.count(model=MODEL, input="And tomorrow?", tools=[TOOL])
    assert chained.input_tokens > alone.input_tokens


async def test_input_tokens_refuses_bad_fields_by_name(client):
    for extra, param in (({"stream": True}, "stream"), ({"truncation": "never"}, "truncation")):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.input_tokens.count(model=MODEL, input="x", extra_body=extra)
        assert caught.value.body["param"] == param


async def test_deltas_carry_obfuscation_unless_the_client_turns_it_off(stack):
    padded = [e for e in await _sse(stack, {"input": "Say hi.", "max_output_tokens": 16})
              if e["type"] == "response.output_text.delta"]
    assert padded and all(isinstance(e["obfuscation"], str) and e["obfuscation"] for e in padded)
    for event in padded:
        validate("ResponseTextDeltaEvent", event)
    plain = await _sse(stack, {"input": "Say hi.", "max_output_tokens": 16,
                               "stream_options": {"include_obfuscation": False}})
    assert not any("obfuscation" in e for e in plain)
    check_stream(plain)


async def test_a_retrieve_returns_logprobs_only_when_included(client):
    response = await client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=16, temperature=0,
                                             include=["message.output_text.logprobs"], top_logprobs=2)
    assert response.output[0].content[0].logprobs
    plain = await client.responses.retrieve(response.id)
    assert plain.output[0].content[0].logprobs == []
    full = await client.responses.retrieve(response.id, include=["message.output_text.logprobs"])
    assert full.output[0].content[0].logprobs == response.output[0].content[0].logprobs
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.retrieve(response.id, include=["nope"])
    assert caught.value.body["param"] == "include[0]"


async def test_reasoning_options_for_a_model_that_does_not_reason(client):
    response = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=16,
                                             reasoning={"summary": "auto"})
    assert response.reasoning.summary is None and response.reasoning.effort is None
    for reasoning, param in (({"effort": "high"}, "reasoning.effort"), ({"summary": "detailed"}, "reasoning.summary")):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(model=MODEL, input="Hi", reasoning=reasoning)
        assert caught.value.body["param"] == param


async def test_client_metadata_is_kept_with_the_response(stack, client):
    async with httpx.AsyncClient(timeout=120) as http:
        reply = await http.post(f"{stack.base_url}/responses", json={
            "model": MODEL, "input": "Hi", "max_output_tokens": 16, "client_metadata": {"originator": "codex"}})
    assert reply.status_code == 200, reply.text
    stored = await client.responses.retrieve(reply.json()["id"])
    assert stored.model_extra["client_metadata"] == {"originator": "codex"}


async def test_tool_choice_none_keeps_the_tools_in_the_prompt_and_calls_out(client):
    question = "What is the weather in Paris? Use the tool."
    offered = await client.responses.create(model=MODEL, input=question, tools=[TOOL], max_output_tokens=24,
                                            temperature=0)
    refused = await client.responses.create(model=MODEL, input=question, tools=[TOOL], tool_choice="none",
                                            max_output_tokens=24, temperature=0)
    # Same prompt under none as under auto: the second request reuses the first one's prefix.
    assert refused.usage.input_tokens == offered.usage.input_tokens
    assert [item.type for item in refused.output] == ["message"]
    assert "<tool_call>" not in refused.output_text
