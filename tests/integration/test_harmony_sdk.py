"""gpt-oss's Harmony format end to end: the official SDK through the real Envoy and the real server,
the TensorRT-LLM adapter over the LLM API fake with a Harmony checkpoint (SmolLM2's tokenizer with
Harmony's markers as special tokens; no gpt-oss tokenizer or model can be fetched here). The
fake's replies are scripted in the documented Harmony shapes; what is checked is Parley's side:
the analysis channel becomes the reasoning item, a commentary message to `functions.NAME` the
call, `final` the answer, and the next turn's prompt carries the call, its reasoning and its
named result as Harmony messages."""

import json

import openai
import pytest
from openai import AsyncOpenAI
from parley import config
from parley.engine.trtllm import TensorRTLLMEngine

from tests.fakes import tensorrt_llm as fake
from tests.support.stack import running_stack
from tests.support.streams import check_stream, event_types

pytestmark = pytest.mark.integration

MODEL = "gpt-oss-fake"
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                               "additionalProperties": False}, "strict": True}
THINK_THEN_CALL = ("<|channel|>analysis<|message|>The user wants Oslo's weather.<|end|><|start|>assistant"
                   '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>')
THINK_THEN_ANSWER = ("<|channel|>analysis<|message|>Report it.<|end|><|start|>assistant<|channel|>final<|message|>"
                     "It is 4 °C in Oslo.<|return|>")


@pytest.fixture(scope="module")
async def harmony_stack(tmp_path_factory, harmony_checkpoint_dir):
    settings = config.load(environ={}, engine="tensorrt_llm", model_path=str(harmony_checkpoint_dir),
                           model_name=MODEL, context_window=4096)
    engine = TensorRTLLMEngine.from_settings(settings, api=fake.install_api())
    async with running_stack(tmp_path_factory.mktemp("harmony") / "parley.sqlite3", engine=engine,
                             model_name=MODEL) as running:
        yield running


def sdk(stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)


def collapsed(types: list[str]) -> list[str]:
    """Event types with each run of deltas written once."""
    return [kind for index, kind in enumerate(types) if not (kind.endswith(".delta") and types[index - 1] == kind)]


async def test_analysis_is_the_reasoning_item_and_a_commentary_message_the_call(harmony_stack):
    llm = harmony_stack.engine._llm
    llm.replies = [THINK_THEN_CALL]
    async with sdk(harmony_stack) as client:
        stream = await client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER_TOOL],
                                               stream=True, max_output_tokens=200)
        events = [event.model_dump(mode="json", exclude_unset=True) async for event in stream]
    response = check_stream(events)
    assert collapsed(event_types(events)) == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    reasoning, call = response["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"][0]["text"] == "The user wants Oslo's weather."
    assert (call["type"], call["name"], json.loads(call["arguments"])) == ("function_call", "get_weather",
                                                                          {"city": "Oslo"})
    assert response["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    prompt = llm.tokenizer.decode(llm.submitted[-1].prompt_token_ids, skip_special_tokens=False)
    assert "namespace functions {" in prompt and "type get_weather = (_: {" in prompt
    assert prompt.endswith("<|start|>user<|message|>Weather in Oslo?<|end|><|start|>assistant")


async def test_the_result_turn_carries_the_named_result_and_the_answer_is_final_only(harmony_stack):
    llm = harmony_stack.engine._llm
    llm.replies = [THINK_THEN_CALL, THINK_THEN_ANSWER]
    async with sdk(harmony_stack) as client:
        first = await client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER_TOOL],
                                              max_output_tokens=200)
        [call] = [item for item in first.output if item.type == "function_call"]
        second = await client.responses.create(
            model=MODEL, previous_response_id=first.id, tools=[WEATHER_TOOL], max_output_tokens=200,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 4}'}])
    assert second.output_text == "It is 4 °C in Oslo."
    assert [item.type for item in second.output] == ["reasoning", "message"]
    prompt = llm.tokenizer.decode(llm.submitted[-1].prompt_token_ids, skip_special_tokens=False)
    assert prompt.endswith(
        "<|start|>user<|message|>Weather in Oslo?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>The user wants Oslo's weather.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}'
        "<|call|>"
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"celsius": 4}<|end|>'
        "<|start|>assistant")


async def test_a_required_call_is_guided_by_the_harmony_grammar(harmony_stack):
    llm = harmony_stack.engine._llm
    llm.replies = [THINK_THEN_CALL]
    async with sdk(harmony_stack) as client:
        response = await client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER_TOOL],
                                                 tool_choice="required", max_output_tokens=200)
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    submitted = llm.submitted[-1]
    grammar = submitted.sampling_params.guided_decoding.grammar
    assert submitted.guide_enforced and "root ::= analysis? ( calls )" in grammar


async def test_the_reasoning_effort_reaches_the_system_message_and_is_echoed(harmony_stack):
    llm = harmony_stack.engine._llm
    llm.replies = [THINK_THEN_ANSWER, THINK_THEN_ANSWER]
    async with sdk(harmony_stack) as client:
        high = await client.responses.create(model=MODEL, input="Weather in Oslo?", reasoning={"effort": "high"},
                                             max_output_tokens=200)
        assert high.reasoning.effort == "high"
        prompt = llm.tokenizer.decode(llm.submitted[-1].prompt_token_ids, skip_special_tokens=False)
        assert "Reasoning: high" in prompt and "Reasoning: medium" not in prompt
        later = await client.responses.create(model=MODEL, previous_response_id=high.id, input="And Bergen?",
                                              max_output_tokens=200)  # each request asks its own effort
        assert later.reasoning.effort is None
        assert "Reasoning: medium" in llm.tokenizer.decode(llm.submitted[-1].prompt_token_ids,
                                                           skip_special_tokens=False)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(model=MODEL, input="hi", reasoning={"effort": "minimal"})
    assert refused.value.body["param"] == "reasoning.effort"
    assert "'low', 'medium', 'high'" in refused.value.body["message"]
