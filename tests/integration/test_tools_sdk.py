"""Function calling, structured outputs and logprobs on the real SmolLM2, through Envoy, with the SDK.

"Guaranteed" here means constrained decoding: even a 135M-parameter model produces valid calls
and valid JSON, because llama.cpp may only sample tokens the grammar allows.
"""

import json

import jsonschema
import openai
import pytest

from tests.integration.conftest import MODEL
from tests.support.streams import check_stream

pytestmark = [pytest.mark.integration, pytest.mark.model]

WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string"},
                                                 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city.",
           "parameters": WEATHER_ARGS, "strict": True}
TIME = {"type": "function", "name": "get_time", "description": "Get the local time in a timezone.",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"],
                       "additionalProperties": False}, "strict": True}
ASK = "What is the weather in Paris right now?"


def calls_of(response):
    return [item for item in response.output if item.type == "function_call"]


async def test_required_tool_choice_guarantees_a_schema_valid_call(client):
    response = await client.responses.create(model=MODEL, input=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                             temperature=0, max_output_tokens=200)
    calls = calls_of(response)
    assert calls and response.status == "completed"
    for call in calls:
        assert call.name in ("get_weather", "get_time") and call.call_id.startswith("call_")
        schema = WEATHER_ARGS if call.name == "get_weather" else TIME["parameters"]
        jsonschema.validate(json.loads(call.arguments), schema)


async def test_named_tool_choice_calls_that_function_once_without_parallel(client):
    response = await client.responses.create(model=MODEL, input=ASK, tools=[WEATHER, TIME], temperature=0,
                                             tool_choice={"type": "function", "name": "get_time"},
                                             parallel_tool_calls=False, max_output_tokens=200)
    [call] = calls_of(response)
    assert call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), TIME["parameters"])


async def test_parallel_calls_are_separate_valid_items(client):
    response = await client.responses.create(
        model=MODEL, input="Weather in Paris and in Rome, please.", tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=True, temperature=0, max_output_tokens=300)
    calls = calls_of(response)
    assert 1 <= len(calls) <= 4 and len({c.call_id for c in calls}) == len(calls)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), WEATHER_ARGS)


async def test_none_never_calls(client):
    response = await client.responses.create(model=MODEL, input=ASK, tools=[WEATHER], tool_choice="none",
                                             temperature=0, max_output_tokens=48)
    assert not calls_of(response) and "<tool_call>" not in response.output_text


async def test_streamed_tool_call_events_in_order(client):
    stream = await client.responses.create(model=MODEL, input=ASK, tools=[WEATHER], temperature=0, stream=True,
                                           tool_choice={"type": "function", "name": "get_weather"},
                                           parallel_tool_calls=False, max_output_tokens=200)
    events = [e.model_dump(mode="json", exclude_unset=True) async for e in stream]
    kinds = [e["type"] for e in events]
    first, last = kinds.index("response.output_item.added"), kinds.index("response.function_call_arguments.done")
    assert set(kinds[first + 1:last]) == {"response.function_call_arguments.delta"}
    assert kinds[last + 1:] == ["response.output_item.done", "response.completed"]
    response = check_stream(events)
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert arguments == response["output"][0]["arguments"] == events[last]["arguments"]
    jsonschema.validate(json.loads(arguments), WEATHER_ARGS)


async def test_two_turn_round_trip_with_and_without_previous_response_id(client):
    first = await client.responses.create(model=MODEL, input=ASK, tools=[WEATHER], tool_choice="required",
                                          parallel_tool_calls=False, temperature=0, max_output_tokens=200)
    [call] = calls_of(first)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21, "sky": "clear"}'}
    chained = await client.responses.create(model=MODEL, previous_response_id=first.id, input=[result],
                                            tools=[WEATHER], temperature=0, max_output_tokens=64)
    assert chained.status in ("completed", "incomplete")
    assert chained.usage.input_tokens > first.usage.input_tokens
    stateless = await client.responses.create(
        model=MODEL, tools=[WEATHER], temperature=0, max_output_tokens=64, store=False,
        input=[{"role": "user", "content": ASK},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               result])
    assert stateless.status in ("completed", "incomplete")
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, tools=[WEATHER], input=[
            {"type": "function_call_output", "call_id": "call_unknown", "output": "x"}])
    assert info.value.body["code"] == "invalid_call_id"


# The grammar admits only valid JSON, and the output is complete once the model stops. A
# greedy 135M model can loop inside an unbounded string or array until max_output_tokens
# (then the response is `incomplete`, as OpenAI's would be), so these schemas are bounded
# (enums, maxItems), as strict mode allows.
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "mood": {"type": "string", "enum": ["happy", "sad", "calm"]},
    "hobbies": {"type": "array", "items": {"type": "string", "enum": ["chess", "music", "hiking", "cooking"]},
                "maxItems": 3}}, "required": ["name", "age", "mood", "hobbies"], "additionalProperties": False}


@pytest.mark.parametrize("prompt", ["Invent a person.", "Describe Ada Lovelace."])
async def test_json_schema_output_always_validates(client, prompt):
    response = await client.responses.create(
        model=MODEL, input=prompt, temperature=0, max_output_tokens=200,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), PERSON)
    assert response.text.format.type == "json_schema" and response.text.format.name == "person"


async def test_json_object_output_is_an_object(client):
    response = await client.responses.create(
        model=MODEL, input="Return a JSON object with the keys name and age for a cat named Tom aged 3.",
        temperature=0, max_output_tokens=200, text={"format": {"type": "json_object"}})
    assert response.status == "completed"
    assert isinstance(json.loads(response.output_text), dict)


async def test_a_json_object_answer_closes_within_a_short_budget(client):
    # Greedy, this prompt runs on inside the object past 32 tokens; the engine closes it in time.
    response = await client.responses.create(
        model=MODEL, input="Describe the history of Rome in great detail as a JSON object.", temperature=0,
        max_output_tokens=32, text={"format": {"type": "json_object"}})
    assert response.status == "completed" and response.usage.output_tokens <= 32
    assert isinstance(json.loads(response.output_text), dict)


async def test_logprobs_are_real_and_sane(client):
    response = await client.responses.create(model=MODEL, input="Say hello.", temperature=0, max_output_tokens=16,
                                             top_logprobs=3, include=["message.output_text.logprobs"])
    part = response.output[0].content[0]
    assert part.logprobs and "".join(lp.token for lp in part.logprobs) == part.text
    for lp in part.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        alternatives = [alt.logprob for alt in lp.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
        assert lp.logprob <= alternatives[0] + 1e-6  # greedy: the chosen token is the most likely
        assert abs(lp.logprob - alternatives[0]) < 1e-4
        assert bytes(lp.bytes).decode("utf-8", "replace") == lp.token
    stream = await client.responses.create(model=MODEL, input="Say hello.", temperature=0, max_output_tokens=16,
                                           top_logprobs=1, include=["message.output_text.logprobs"], stream=True)
    deltas = [e async for e in stream if e.type == "response.output_text.delta"]
    assert all(len(d.logprobs) == 1 and d.logprobs[0].logprob <= 0 for d in deltas)


BAD = [
    ({"tools": [{"type": "function", "parameters": WEATHER_ARGS}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]}, "tools[0].parameters.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "launch_rocket"}}, "tool_choice.name"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "strict": True,
                          "schema": {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}},
                                     "required": ["a"], "additionalProperties": False}}}},
     "text.format.schema.properties.a.maxLength"),
]


@pytest.mark.parametrize("extra,param", BAD, ids=[b[1] for b in BAD])
async def test_bad_tool_inputs_are_400s_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, input="x", **extra)
    assert info.value.body["param"] == param


@pytest.mark.parametrize("prompt", [ASK, "Tell me a joke.", "Use the weather tool for Oslo in celsius."])
async def test_auto_gives_text_or_valid_calls(client, prompt):
    response = await client.responses.create(model=MODEL, input=prompt, tools=[WEATHER], tool_choice="auto",
                                             temperature=0, max_output_tokens=120)
    for call in calls_of(response):
        jsonschema.validate(json.loads(call.arguments), WEATHER_ARGS)
    assert calls_of(response) or response.output_text


class Place(__import__("pydantic").BaseModel):
    name: str
    code: str


class Trip(__import__("pydantic").BaseModel):
    origin: Place
    destination: Place
    nights: int


async def test_a_nested_pydantic_model_with_refs_parses(client):
    """`responses.parse` sends a strict schema whose nested models are `$defs` behind `$ref`s."""
    response = await client.responses.parse(model=MODEL, input="Plan a trip from Paris to Rome for 3 nights.",
                                            text_format=Trip, temperature=0, max_output_tokens=200)
    assert response.status == "completed" and isinstance(response.output_parsed, Trip)


async def test_an_unanchored_pattern_is_enforced_anywhere_in_the_string(client):
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "[0-9]{3}"}},
              "required": ["code"], "additionalProperties": False}
    response = await client.responses.create(
        model=MODEL, input="Reply with the code 123.", temperature=0, max_output_tokens=100,
        text={"format": {"type": "json_schema", "name": "code", "schema": schema, "strict": True}})
    # The grammar holds the string to the pattern; a 135M model may still ramble before it until
    # the budget runs out (then the response says so). Never a failed response.
    assert response.status in ("completed", "incomplete")
    if response.status == "completed":
        assert __import__("re").search("[0-9]{3}", json.loads(response.output_text)["code"])


async def test_a_plain_tool_schema_without_strict_is_taken_as_non_strict(client):
    plain = {"type": "function", "name": "lookup", "description": "Look a word up.",
             "parameters": {"type": "object", "properties": {"word": {"type": "string"},
                                                             "language": {"type": "string"}}, "required": ["word"]}}
    response = await client.responses.create(model=MODEL, input="Look up the word 'cat'.", tools=[plain],
                                             tool_choice="required", temperature=0, max_output_tokens=100)
    assert response.tools[0].strict is False
    [call] = calls_of(response)[:1]
    jsonschema.validate(json.loads(call.arguments), plain["parameters"])
    with pytest.raises(openai.BadRequestError) as refused:  # strict asked for explicitly: the schema must fit it
        await client.responses.create(model=MODEL, input="x", tools=[{**plain, "strict": True}])
    assert refused.value.body["param"].startswith("tools[0].parameters")
