"""The TensorRT-LLM adapter over a fake that keeps the LLM API's contract (tests/fakes/tensorrt_llm.py):
settings to LLM() arguments, prompts from the checkpoint's template, streaming, sampling and guided
decoding, abort, and every error path."""

import asyncio
import dataclasses
import json

import pytest
from parley import config
from parley.engine import template_tools
from parley.engine.base import ChatMessage, Constraint, EngineDead, RequestFailed, SamplingParams, TextDelta
from parley.engine.formats import tool_format
from parley.engine.llamacpp import LlamaCppEngine, default_model_path
from parley.engine.trtllm import TensorRTLLMEngine
from parley.service.conversation import to_messages

from tests.fakes import tensorrt_llm as fake
from tests.fakes.checkpoint import TOOLS_TEMPLATE, templated_checkpoint
from tests.support.generations import collect, eventually
from tests.support.tool_turn import TEMPLATE_RENDERED, TOOL_TURN, WEATHER_TOOL


def settings_for(checkpoint, **overrides):
    return config.load(environ={}, **{"engine": "tensorrt_llm", "model_path": str(checkpoint),
                                      "context_window": 4096, **overrides})


@pytest.fixture
def engine(smollm2_checkpoint_dir):
    return TensorRTLLMEngine.from_settings(settings_for(smollm2_checkpoint_dir), api=fake.install_api())




# -- settings and construction ---------------------------------------------------------------------


def test_settings_become_llm_arguments(smollm2_checkpoint_dir):
    settings = settings_for(smollm2_checkpoint_dir, trtllm_tensor_parallel_size=2, trtllm_max_batch_size=64,
                            trtllm_kv_cache_free_gpu_memory_fraction=0.8, trtllm_kv_cache_block_reuse=False)
    engine = TensorRTLLMEngine.from_settings(settings, api=fake.install_api())
    args = engine._llm.args
    assert args["model"] == str(smollm2_checkpoint_dir)
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"], args["max_batch_size"]) == (2, 1, 64)
    assert args["guided_decoding_backend"] == "xgrammar"  # set at construction, or guides are silently ignored
    assert (args["max_seq_len"], args["max_num_tokens"], args["enable_chunked_prefill"]) == (4096, 8192, False)
    kv = args["kv_cache_config"]
    assert (kv.enable_block_reuse, kv.free_gpu_memory_fraction) == (False, 0.8)
    assert engine.model_id == settings.model_name and engine.context_window == 4096


def test_extra_options_reach_llm_and_an_unknown_one_stops_start_up(smollm2_checkpoint_dir, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("stream_interval: 4\nkv_cache_config:\n  tokens_per_block: 64\n")
    engine = TensorRTLLMEngine.from_settings(settings_for(smollm2_checkpoint_dir, trtllm_extra_options=str(extra)),
                                             api=fake.install_api())
    assert engine._llm.args["stream_interval"] == 4
    assert engine._llm.kv_cache_config.tokens_per_block == 64
    extra.write_text("speculative_decoding_mode: eagle\n")
    with pytest.raises(ValueError, match="LLM got invalid argument: speculative_decoding_mode"):
        TensorRTLLMEngine.from_settings(settings_for(smollm2_checkpoint_dir, trtllm_extra_options=str(extra)),
                                        api=fake.install_api())


def test_more_gpus_than_visible_stops_start_up(smollm2_checkpoint_dir):
    with pytest.raises(RuntimeError, match="GPUs are visible"):
        TensorRTLLMEngine.from_settings(settings_for(smollm2_checkpoint_dir, trtllm_tensor_parallel_size=16),
                                        api=fake.install_api())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model_path": ""}, "needs model_path: a Hugging Face checkpoint directory"),
    ({"context_window": 16384}, "exceeds trtllm_max_num_tokens"),
    ({"trtllm_guided_decoding_backend": "outlines"}, "trtllm_guided_decoding_backend must be one of"),
    ({"trtllm_kv_cache_free_gpu_memory_fraction": 0.0}, "free_gpu_memory_fraction must be in"),
    ({"trtllm_tool_format": "gpt"}, "trtllm_tool_format must be one of"),
    ({"kv_cache": "per_sequence"}, "kv_cache is a llamacpp setting"),
    ({"trtllm_extra_options": "/nonexistent.yaml"}, "is not a file"),
])
def test_bad_or_foreign_settings_stop_start_up_naming_them(smollm2_checkpoint_dir, overrides, message):
    values = {"model_path": str(smollm2_checkpoint_dir), "context_window": 4096, **overrides}
    with pytest.raises(ValueError, match=message):
        config.load(environ={}, engine="tensorrt_llm", **values)


def test_tensorrt_llm_settings_given_to_another_engine_are_refused():
    with pytest.raises(ValueError, match="trtllm_tensor_parallel_size is a tensorrt_llm setting"):
        config.load(environ={}, engine="scripted", trtllm_tensor_parallel_size=2)


def test_chunked_prefill_lifts_the_prompt_limit(smollm2_checkpoint_dir):
    assert settings_for(smollm2_checkpoint_dir, context_window=32768, trtllm_enable_chunked_prefill=True)
    with pytest.raises(ValueError, match="exceeds trtllm_max_num_tokens"):
        settings_for(smollm2_checkpoint_dir, context_window=32768)


def test_without_the_package_the_error_says_what_is_missing(monkeypatch):
    import sys

    from parley.engine.trtllm import load_api

    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # `import tensorrt_llm` fails, installed or not
    with pytest.raises(RuntimeError, match="needs the tensorrt_llm package"):
        load_api()


# -- prompts ---------------------------------------------------------------------------------------


def test_prompts_are_the_checkpoint_template_and_tokenizer_as_llamacpp_renders_them(engine):
    messages = [ChatMessage("developer", "Answer briefly."), ChatMessage("user", "What is 2 + 2?"),
                ChatMessage("assistant", "4"), ChatMessage("user", "And 3 + 3?")]
    llamacpp = LlamaCppEngine(default_model_path(), "SmolLM2", context_window=512, threads=1, sequences=1)
    try:
        assert engine.render_prompt(messages) == llamacpp.render_prompt(messages)
    finally:
        asyncio.run(llamacpp.close())
    assert (engine.tool_format, engine.reasoning_format) == ("hermes", "none")


@pytest.fixture
def harmony_engine(harmony_checkpoint_dir):
    return TensorRTLLMEngine.from_settings(settings_for(harmony_checkpoint_dir), api=fake.install_api())


def test_a_harmony_checkpoint_is_rendered_by_parley_not_its_template(harmony_engine):
    from parley.engine.formats import harmony

    assert (harmony_engine.tool_format, harmony_engine.reasoning_format) == ("harmony", "harmony")
    assert harmony_engine.message_rendering is None  # results name their calls: rendered whole
    messages = [ChatMessage("developer", "# Instructions\n\nBe brief."), ChatMessage("user", "Hi")]
    prompt = harmony_engine.render_prompt(messages)
    hf = harmony_engine._llm.tokenizer.tokenizer
    assert hf.decode(prompt, skip_special_tokens=False) == harmony.render(messages, True)
    markers = {hf.convert_tokens_to_ids(marker) for marker in harmony.MARKERS}
    text = harmony.render(messages, True)
    assert sum(token in markers for token in prompt) == sum(text.count(marker) for marker in harmony.MARKERS)


async def test_harmony_keeps_its_markers_in_the_text_and_stops_on_return_and_call(harmony_engine):
    llm = harmony_engine._llm
    call = ('<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant<|channel|>commentary '
            'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')
    llm.replies = [call + "<|call|>never reached"]
    prompt = harmony_engine.render_prompt([ChatMessage("user", "weather?")])
    deltas, finished = await collect(harmony_engine, prompt, SamplingParams(max_tokens=200))
    assert "".join(delta.text for delta in deltas) == call and finished.reason == "stop"
    sampling = llm.submitted[-1].sampling_params
    assert (sampling.skip_special_tokens, sampling.spaces_between_special_tokens) == (False, False)
    hf = llm.tokenizer.tokenizer
    assert sampling.stop_token_ids == [hf.convert_tokens_to_ids("<|return|>"), hf.convert_tokens_to_ids("<|call|>")]


async def test_other_families_decode_without_markup_as_before(engine):
    await collect(engine, engine.render_prompt([ChatMessage("user", "hi")]), SamplingParams(max_tokens=8))
    sampling = engine._llm.submitted[-1].sampling_params
    assert sampling.skip_special_tokens and sampling.stop_token_ids is None


async def test_harmony_calls_in_auto_mode_are_a_structural_tag_on_the_commentary_channel(harmony_engine):
    constraint = Constraint(kind="tools", tools=(WEATHER,), mode="auto")
    harmony_engine.check_constraint(constraint)
    harmony_engine._llm.replies = ['<|channel|>final<|message|>{"a": 1}']
    await collect(harmony_engine, harmony_engine.render_prompt([ChatMessage("user", "w?")]),
                  SamplingParams(max_tokens=64, constraint=constraint))
    tag = json.loads(harmony_engine._llm.submitted[-1].sampling_params.guided_decoding.structural_tag)
    assert tag["triggers"] == ["<|channel|>commentary to=functions."]
    assert tag["structures"] == [{"begin": "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",
                                  "schema": WEATHER[1], "end": "<|call|>"}]


def test_a_tool_format_that_does_not_fit_a_harmony_checkpoint_stops_start_up(harmony_checkpoint_dir):
    with pytest.raises(ValueError, match="trtllm_tool_format 'hermes' does not fit"):
        TensorRTLLMEngine.from_settings(settings_for(harmony_checkpoint_dir, trtllm_tool_format="hermes"),
                                        api=fake.install_api())


def test_harmony_on_a_tokenizer_without_its_markers_stops_start_up(smollm2_checkpoint_dir):
    with pytest.raises(RuntimeError, match="no special token '<\\|return\\|>'"):
        TensorRTLLMEngine.from_settings(settings_for(smollm2_checkpoint_dir, trtllm_tool_format="harmony"),
                                        api=fake.install_api())


# -- a template that renders tools itself ----------------------------------------------------------

def tool_turn_messages(engine, items=TOOL_TURN):
    fmt = tool_format(engine.tool_format, native=engine.native_tools)
    return to_messages("Be brief.", items, [WEATHER_TOOL], fmt, engine.reasoning_format)


def decoded(engine, prompt: list[int]) -> str:
    return engine._llm.tokenizer.tokenizer.decode(prompt, skip_special_tokens=False)


def test_a_template_that_renders_tools_writes_the_tools_calls_and_results_itself(tools_checkpoint_dir):
    engine = TensorRTLLMEngine.from_settings(settings_for(tools_checkpoint_dir), api=fake.install_api())
    assert engine.native_tools and engine.tool_format == "hermes"
    assert engine.message_rendering is None  # the template groups results: rendered whole
    assert decoded(engine, engine.render_prompt(tool_turn_messages(engine))) == TEMPLATE_RENDERED


def test_without_template_tools_parley_writes_the_family_format(tools_checkpoint_dir):
    engine = TensorRTLLMEngine.from_settings(settings_for(tools_checkpoint_dir, template_tools=False),
                                             api=fake.install_api())
    assert not engine.native_tools
    text = decoded(engine, engine.render_prompt(tool_turn_messages(engine)))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to "
                           "assist with the user query.\nYou are provided")  # Parley's words, in the system turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text


def test_a_turn_the_template_refuses_is_rendered_in_the_family_format(tools_checkpoint_dir, tmp_path):
    refusing = TOOLS_TEMPLATE.replace(
        "{%- for call in message.tool_calls -%}",
        "{%- if message.tool_calls | length > 1 -%}{{- raise_exception('one call at a time') -}}{%- endif -%}"
        "{%- for call in message.tool_calls -%}")
    checkpoint = templated_checkpoint(tmp_path / "refusing", tools_checkpoint_dir, refusing)
    engine = TensorRTLLMEngine.from_settings(settings_for(checkpoint), api=fake.install_api())
    assert engine.native_tools  # one call passes the probe
    messages = tool_turn_messages(engine)
    parley_written = TensorRTLLMEngine.from_settings(settings_for(checkpoint, template_tools=False),
                                                     api=fake.install_api())
    family = parley_written.render_prompt(tool_turn_messages(parley_written))
    assert engine.render_prompt(messages) == family  # two calls: the template's refusal is not the client's
    one_call = tool_turn_messages(engine, [TOOL_TURN[0], TOOL_TURN[1], TOOL_TURN[3]])
    assert '<tool_call>\n{"name": "get_weather"' in decoded(engine, engine.render_prompt(one_call))


@pytest.mark.parametrize(("change", "reason"), [
    (("{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' -}}", ""), "the result"),
    (("\"arguments\": ' -}}", "\"parameters\": ' -}}"), "the call in the family's format"),
    (("{{- tool | tojson -}}", "{{- tool.function.name -}}"), "the tool's description"),
    (("{%- if tools -%}", "{%- if false -%}"), "the tool's description"),
])
def test_a_template_that_mentions_tools_but_drops_part_of_a_turn_is_not_trusted_with_them(
        tools_checkpoint_dir, tmp_path, change, reason):
    template = TOOLS_TEMPLATE.replace(*change)
    assert template != TOOLS_TEMPLATE
    engine = TensorRTLLMEngine.from_settings(settings_for(templated_checkpoint(tmp_path / "t", tools_checkpoint_dir,
                                                                                template)), api=fake.install_api())
    assert not engine.native_tools
    trusted, why = template_tools.check(template, engine._render_chat, engine._format)
    assert not trusted and reason in why


def test_a_template_that_turns_thinking_off_takes_effort_none(thinking_checkpoint_dir):
    engine = TensorRTLLMEngine.from_settings(settings_for(thinking_checkpoint_dir), api=fake.install_api())
    assert (engine.reasoning_format, engine.native_tools, engine.reasoning_efforts) == ("think", True, ("none",))
    fmt = tool_format(engine.tool_format, native=True, efforts=engine.reasoning_efforts)
    user = [{"type": "message", "role": "user", "content": "Hi"}]
    off = decoded(engine, engine.render_prompt(to_messages(None, user, None, fmt, "think", effort="none")))
    assert off == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    natural = decoded(engine, engine.render_prompt(to_messages(None, user, None, fmt, "think")))
    assert natural == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    briefly = decoded(engine, engine.render_prompt(to_messages("Be brief.", user, None, fmt, "think", effort="none")))
    assert briefly.startswith("<|im_start|>system\nBe brief.<|im_end|>") and briefly.endswith("</think>\n\n")
    by_message = TensorRTLLMEngine.from_settings(settings_for(thinking_checkpoint_dir, template_tools=False),
                                                 api=fake.install_api())
    # Rendered message by message, the generation prompt is kept: thinking cannot be switched off.
    assert by_message.message_rendering is not None and by_message.reasoning_efforts == ()


def test_a_template_without_tools_is_rendered_as_before(engine):
    assert not engine.native_tools
    assert template_tools.check(engine._llm.tokenizer.tokenizer.chat_template, engine._render_chat,
                                engine._format) == (False, "the chat template takes no tools")


# -- generation ------------------------------------------------------------------------------------


async def test_streams_the_text_of_each_step_then_finishes_with_usage(engine):
    prompt = engine.render_prompt([ChatMessage("user", "Say hello.")])
    deltas, finished = await collect(engine, prompt, SamplingParams(max_tokens=64))
    assert "".join(d.text for d in deltas) == engine._llm.default_reply
    assert sum(d.tokens for d in deltas) == finished.output_tokens > 3
    assert (finished.reason, finished.input_tokens) == ("stop", len(prompt))
    submitted = engine._llm.submitted[-1]
    assert submitted.streaming and submitted.prompt_token_ids == prompt  # token ids, tokenized by Parley


async def test_every_sampling_field_is_set_on_a_fresh_sampling_params(engine):
    prompt = engine.render_prompt([ChatMessage("user", "hi")])
    params = SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5, presence_penalty=0.5,
                            frequency_penalty=-0.25, seed=11)
    await collect(engine, prompt, params)
    await collect(engine, prompt, params)
    first, second = (s.sampling_params for s in engine._llm.submitted[-2:])
    assert first is not second  # the engine mutates what it gets
    assert (first.max_tokens, first.temperature, first.top_p, first.presence_penalty, first.frequency_penalty,
            first.seed, first.logprobs, first.guided_decoding) == (7, 0.0, 0.5, 0.5, -0.25, 11, None, None)


async def test_max_tokens_is_length_and_the_budget_never_passes_the_window(engine):
    engine._llm.replies = ["one two three four five six seven eight nine ten"]
    prompt = engine.render_prompt([ChatMessage("user", "count")])
    _, finished = await collect(engine, prompt, SamplingParams(max_tokens=3))
    assert (finished.reason, finished.output_tokens) == ("length", 3)
    await collect(engine, prompt, SamplingParams(max_tokens=10**6))
    assert engine._llm.submitted[-1].sampling_params.max_tokens == engine.context_window - len(prompt)


async def test_cached_tokens_come_from_the_engine_clamped_to_the_prompt(engine):
    long_history = [ChatMessage("user", "word " * 200)]
    prompt = engine.render_prompt(long_history)
    _, first = await collect(engine, prompt, SamplingParams(max_tokens=4))
    _, second = await collect(engine, prompt + [28, 29], SamplingParams(max_tokens=4))
    assert first.cached_tokens == 0
    assert second.cached_tokens == len(prompt) // 32 * 32 > 0  # whole KV blocks of the shared prefix
    engine._llm.cached_override = 10**6
    _, third = await collect(engine, prompt, SamplingParams(max_tokens=4))
    assert third.cached_tokens == len(prompt)


async def test_logprobs_become_the_sampled_token_and_its_alternatives(engine):
    prompt = engine.render_prompt([ChatMessage("user", "hi")])
    deltas, _ = await collect(engine, prompt, SamplingParams(max_tokens=3, top_logprobs=2))
    assert engine._llm.submitted[-1].sampling_params.logprobs == 2
    first = deltas[0].logprobs[0]
    assert first.token == deltas[0].text and first.logprob == -0.25 and first.bytes == tuple(first.token.encode())
    assert [alternative[1] for alternative in first.top] == [-0.25, -1.0, -2.0]  # by rank, the sampled first


async def test_closing_the_stream_aborts_the_request(engine):
    engine._llm.step_seconds = 0.01
    prompt = engine.render_prompt([ChatMessage("user", "hi")])
    steps = engine.generate(prompt, SamplingParams(max_tokens=64))
    assert isinstance(await anext(steps), TextDelta)
    await steps.aclose()
    output = engine._llm.submitted[-1].output
    assert output.aborted()
    await output.aresult()  # the engine's next step ends it as cancelled, without raising
    assert output.outputs[0].finish_reason == "cancelled"


async def test_a_request_the_engine_cancels_itself_fails(engine):
    prompt = engine.render_prompt([ChatMessage("user", "hi")])
    steps = engine.generate(prompt, SamplingParams(max_tokens=64))
    await anext(steps)
    engine._llm.submitted[-1].output.abort()  # e.g. the executor dropped it
    with pytest.raises(RequestFailed, match="cancelled"):
        async for _ in steps:
            pass


async def test_a_request_error_mid_stream_fails_that_request_only(engine):
    engine._llm.fail_after = (2, "Encountered an error in forward step")
    prompt = engine.render_prompt([ChatMessage("user", "hi")])
    with pytest.raises(RequestFailed, match="forward step"):
        await collect(engine, prompt, SamplingParams(max_tokens=64))
    engine._llm.fail_after = None
    assert engine.health().ok
    _, finished = await collect(engine, prompt, SamplingParams(max_tokens=64))
    assert finished.reason == "stop"


async def test_an_over_long_prompt_is_a_request_failure_not_a_crash(engine):
    engine._llm.max_num_tokens = 8
    with pytest.raises(RequestFailed, match="should not exceed max_num_tokens"):
        await collect(engine, list(range(100)), SamplingParams(max_tokens=4))


async def test_a_dead_engine_fails_every_running_request_and_refuses_new_ones(engine):
    engine._llm.step_seconds = 0.05
    prompt = engine.render_prompt([ChatMessage("user", "hi")])
    running = [asyncio.create_task(collect(engine, prompt, SamplingParams(max_tokens=64))) for _ in range(3)]
    await asyncio.sleep(0.02)
    engine._llm.kill("rank 1 exited")
    results = await asyncio.gather(*running, return_exceptions=True)
    assert all(isinstance(result, EngineDead) and "rank 1 exited" in str(result) for result in results)
    health = engine.health()
    assert not health.ok and "EngineDeadError" in health.detail
    with pytest.raises(EngineDead):
        await collect(engine, prompt, SamplingParams(max_tokens=4))


async def test_an_unhealthy_executor_is_reported(engine):
    engine._llm.fatal = "executor worker hung"  # the executor says so before any request noticed
    assert not engine.health().ok
    engine._llm.fatal = None
    await engine.close()
    assert engine._llm.shut_down and not engine.health().ok


# -- guided decoding -------------------------------------------------------------------------------

WEATHER = ("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                           "additionalProperties": False})


async def test_tool_calls_in_auto_mode_are_a_structural_tag_triggered_by_the_family_marker(engine):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    engine._llm.replies = [call]
    constraint = Constraint(kind="tools", tools=(WEATHER,), mode="auto")
    engine.check_constraint(constraint)
    prompt = engine.render_prompt([ChatMessage("user", "weather?")])
    deltas, _ = await collect(engine, prompt, SamplingParams(max_tokens=64, constraint=constraint))
    assert "".join(d.text for d in deltas) == call
    submitted = engine._llm.submitted[-1]
    assert submitted.guide_enforced
    tag = json.loads(submitted.sampling_params.guided_decoding.structural_tag)
    assert tag["triggers"] == ["<tool_call>"]
    assert tag["structures"] == [{"begin": '<tool_call>\n{"name": "get_weather", "arguments": ',
                                  "schema": WEATHER[1], "end": "}\n</tool_call>"}]


@pytest.mark.parametrize("constraint", [
    Constraint(kind="tools", tools=(WEATHER,), mode="required"),
    Constraint(kind="json_schema", schema={"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}},
                                           "$defs": {"n": {"type": "integer"}}}),
    Constraint(kind="json_object"),
], ids=["required", "json_schema", "json_object"])
async def test_other_constraints_are_the_same_grammar_llamacpp_enforces(engine, constraint):
    from parley.engine.formats import HERMES
    from parley.engine.grammar import compile_constraint

    engine._llm.replies = ['{"a": 1}'] if constraint.kind != "tools" else ["x"]
    prompt = engine.render_prompt([ChatMessage("user", "json please")])
    await collect(engine, prompt, SamplingParams(max_tokens=16, constraint=constraint))
    guide = engine._llm.submitted[-1].sampling_params.guided_decoding
    assert guide.grammar == compile_constraint(constraint, HERMES)
    assert (guide.json, guide.structural_tag, guide.json_object) == (None, None, False)


def test_what_the_grammar_cannot_express_is_refused_before_anything_runs(engine):
    with pytest.raises(ValueError, match="lookarounds"):
        engine.check_constraint(Constraint(kind="json_schema", schema={"type": "string", "pattern": "^(?=a)b$"}))


def test_without_a_guided_decoding_backend_constraints_are_refused_not_ignored(smollm2_checkpoint_dir):
    engine = TensorRTLLMEngine.from_settings(
        settings_for(smollm2_checkpoint_dir, trtllm_guided_decoding_backend="none"), api=fake.install_api())
    assert "guided_decoding_backend" not in engine._llm.args
    engine.check_constraint(None)
    with pytest.raises(ValueError, match="without a guided-decoding backend"):
        engine.check_constraint(Constraint(kind="json_object"))


async def test_prefixes_are_cached_per_scope_through_cache_salt(engine):
    prompt = engine.render_prompt([ChatMessage("user", "word " * 200)])
    _, first = await collect(engine, prompt, SamplingParams(max_tokens=4, cache_scope="acme"))
    _, same = await collect(engine, prompt, SamplingParams(max_tokens=4, cache_scope="acme"))
    _, other = await collect(engine, prompt, SamplingParams(max_tokens=4, cache_scope="globex"))
    assert (first.cached_tokens, other.cached_tokens) == (0, 0) and same.cached_tokens > 0
    assert [s.keywords["cache_salt"] for s in engine._llm.submitted[-3:]] == ["acme", "acme", "globex"]


async def test_a_build_without_cache_salt_is_not_given_one(smollm2_checkpoint_dir):
    class OlderLLM(fake.LLM):  # generate_async before cache_salt existed
        def generate_async(self, inputs, sampling_params=None, lora_request=None, prompt_adapter_request=None,
                           streaming=False):
            return super().generate_async(inputs, sampling_params, lora_request, prompt_adapter_request, streaming)

    api = dataclasses.replace(fake.install_api(), LLM=OlderLLM)
    engine = TensorRTLLMEngine.from_settings(settings_for(smollm2_checkpoint_dir), api=api)
    _, finished = await collect(engine, [1, 2, 3], SamplingParams(max_tokens=4, cache_scope="acme"))
    assert finished.output_tokens == 4 and engine._llm.submitted[-1].keywords["cache_salt"] is None


async def test_a_guide_is_compiled_once_and_a_converter_failure_is_a_refusal(engine, monkeypatch):
    from parley.engine import trtllm

    compiled = []

    def counting(constraint, fmt, reasoning=False):
        compiled.append(constraint)
        if constraint.schema == {"type": "broken"}:
            raise AssertionError("Unrecognized schema")  # as llama.cpp's converter fails
        return "root ::= \"{}\"\n"

    monkeypatch.setattr(trtllm, "compile_constraint", counting)
    constraint = Constraint(kind="json_schema", schema={"type": "object"})
    engine.check_constraint(constraint)  # before the request is stored
    prompt = engine.render_prompt([ChatMessage("user", "json")])
    engine._llm.replies = ["{}"]
    await collect(engine, prompt, SamplingParams(max_tokens=8, constraint=constraint))  # its run
    assert len(compiled) == 1
    with pytest.raises(ValueError, match="Unrecognized schema"):
        engine.check_constraint(Constraint(kind="json_schema", schema={"type": "broken"}))


# -- iteration stats: the KV cache's usage ---------------------------------------------------------




async def test_kv_cache_usage_follows_the_iteration_stats(engine, monkeypatch):
    monkeypatch.setattr(TensorRTLLMEngine, "STATS_TIMEOUT_SECONDS", 0.1)
    monkeypatch.setattr(TensorRTLLMEngine, "STATS_RETRY_SECONDS", 0.02)
    assert engine._llm.args["enable_iter_perf_stats"] is True  # without it the PyTorch backend reports none
    await engine.start()
    assert engine.kv_cache_usage() == 0.0
    engine._llm.step_seconds = 0.02
    prompt = engine.render_prompt([ChatMessage("user", "hi " * 100)])
    running = [asyncio.create_task(collect(engine, prompt, SamplingParams(max_tokens=64))) for _ in range(4)]
    per_sequence = -(-len(prompt) // engine._llm.kv_cache_config.tokens_per_block) / fake.LLM.KV_BLOCKS
    await eventually(lambda: engine.kv_cache_usage() >= 4 * per_sequence)
    await asyncio.gather(*running)
    await eventually(lambda: engine.kv_cache_usage() == 0.0)  # idle: the round ended with no step
    await engine.close()
    assert engine._stats.done()


async def test_without_iteration_stats_the_usage_is_unknown_not_zero(smollm2_checkpoint_dir):
    engine = TensorRTLLMEngine.from_settings(settings_for(smollm2_checkpoint_dir, trtllm_iteration_stats=False),
                                             api=fake.install_api())
    assert "enable_iter_perf_stats" not in engine._llm.args
    await engine.start()
    assert engine._stats is None and engine.kv_cache_usage() is None


async def test_a_failing_stats_queue_is_logged_and_retried_not_fatal(engine, monkeypatch):
    monkeypatch.setattr(TensorRTLLMEngine, "STATS_RETRY_SECONDS", 0.01)
    engine._llm.stats_error = "stats queue closed"
    await engine.start()
    await asyncio.sleep(0.1)
    assert engine.health().ok and engine.kv_cache_usage() == 0.0
    engine._llm.stats_error = None
    engine._llm.step_seconds = 0.02
    prompt = engine.render_prompt([ChatMessage("user", "hi")])
    running = asyncio.create_task(collect(engine, prompt, SamplingParams(max_tokens=32)))
    await eventually(lambda: engine.kv_cache_usage() > 0)  # it asked again
    await running
    await engine.close()


def test_snapshots_are_read_defensively(engine):
    engine._note_stats('{"kvCacheStats": {"usedNumBlocks": 512, "maxNumBlocks": 1024}}')
    assert engine.kv_cache_usage() == 0.5
    engine._note_stats({"kvCacheStats": {"usedNumBlocks": 3, "maxNumBlocks": 0}})  # no capacity: ignored
    engine._note_stats({"kvCacheStats": None})
    engine._note_stats({"attentionDpRank": 1, "kvCacheStats": {"usedNumBlocks": 900, "maxNumBlocks": 1024}})
    assert engine.kv_cache_usage() == pytest.approx(900 / 1024)  # the fullest rank
