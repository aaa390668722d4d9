"""POST /v1/responses/input_tokens against the scripted engine: the count is the prompt the
engine gets for the same fields, and nothing is stored."""

import pytest
from parley.errors import ApiError

from tests.fakes.engines import ScriptedEngine
from tests.support.pipeline import service_on, stream

MODEL = "scripted"
WEATHER = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}


@pytest.fixture
async def service(tmp_path):
    engine = ScriptedEngine(model_id=MODEL, context_window=4096, script=["Hi", "!"])
    async with service_on(tmp_path / "p.sqlite3", engine) as service:
        yield service


async def count(service, **body) -> int:
    result = await service.count_input_tokens("default", body)
    assert result["object"] == "response.input_tokens"
    return result["input_tokens"]


async def test_the_count_is_the_prompt_the_engine_gets(service):
    fields = {"input": "What is the weather in Paris?", "instructions": "Be brief.", "tools": [WEATHER]}
    counted = await count(service, **fields)
    events = await stream(service, **fields)
    assert counted == len(service.engine.last_prompt) == events[-1]["response"]["usage"]["input_tokens"]
    assert counted > await count(service, input="What is the weather in Paris?")  # tools and instructions count


async def test_the_count_follows_the_chain_and_stores_nothing(service):
    first = await service.create("default", {"model": MODEL, "input": "Remember: 42."})
    alone = await count(service, input="What was it?")
    chained = await count(service, input="What was it?", previous_response_id=first["id"])
    assert chained > alone
    assert len(await service.store.input_items(first["id"], "default")) == 1


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "stream": True}, "stream"),
    ({"input": "x", "personality": "friendly"}, "personality"),
    ({"input": "x", "model": "other"}, "model"),
    ({"input": "x", "truncation": "sometimes"}, "truncation"),
    ({"input": [{"type": "message", "role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": "x", "previous_response_id": "resp_missing"}, "previous_response_id"),
])
async def test_bad_fields_are_refused_by_name(service, body, param):
    with pytest.raises(ApiError) as caught:
        await service.count_input_tokens("default", body)
    assert caught.value.param == param and caught.value.kind.http_status in (400, 404)


async def test_another_projects_response_is_not_found(service):
    first = await service.create("default", {"model": MODEL, "input": "x"})
    with pytest.raises(ApiError) as caught:
        await service.count_input_tokens("other", {"input": "y", "previous_response_id": first["id"]})
    assert caught.value.code == "previous_response_not_found"
