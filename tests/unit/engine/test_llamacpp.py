"""The llama.cpp engine: its pure pieces, and the real SmolLM2 decoding several sequences at once."""

import asyncio

import pytest
from parley.engine.base import ChatMessage, Finished, SamplingParams, TextDelta
from parley.engine.llamacpp import (
    MAX_UNREAD_ITEMS,
    PREFIX_GRACE_STEPS,
    LlamaCppEngine,
    _runs,
    _shared_prefix,
    default_model_path,
)

from tests.fakes.llamacpp import EndlessLlamaCppEngine


def test_runs_count_blocks_of_consecutive_slots():
    assert [_runs(slots) for slots in (set(), {3}, {0, 1, 2}, {0, 2}, {0, 1, 3, 5, 6})] == [0, 1, 1, 2, 3]


def test_the_reused_prefix_always_leaves_the_last_prompt_token_to_evaluate():
    assert _shared_prefix([1, 2, 3, 4], [1, 2, 3, 4]) == 3
    assert _shared_prefix([1, 2, 9], [1, 2, 3, 4]) == 2
    assert _shared_prefix([], [1, 2]) == 0
    assert _shared_prefix([1, 2, 3, 4, 5, 6], [1, 2, 3]) == 2


# -- the real model --------------------------------------------------------------------------------

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe the water cycle for a child.", "How do bees make honey?", "Write a poem about autumn."]


@pytest.fixture(scope="module")
async def engine():
    engine = LlamaCppEngine(default_model_path(), "SmolLM2-135M-Instruct", context_window=1024, threads=0,
                            sequences=4)
    yield engine
    await engine.close()


async def run(engine, text: str, **params) -> tuple[str, Finished]:
    pieces, finished = [], None
    async for step in engine.generate(engine.render_prompt([ChatMessage("user", text)]),
                                      SamplingParams(**{"max_tokens": 24, "temperature": 0, **params})):
        for event in step if isinstance(step, list) else [step]:
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            else:
                finished = event
    return "".join(pieces), finished


@pytest.mark.model
async def test_more_requests_than_sequences_all_finish_with_their_own_counts(engine):
    results = await asyncio.gather(*(run(engine, prompt) for prompt in PROMPTS + PROMPTS[:3]))
    for text, finished in results:
        assert finished.output_tokens > 0 and text
        assert finished.reason == "stop" or finished.output_tokens == 24
    assert len({text for text, _ in results}) >= 4  # each sequence got its own prompt's answer


@pytest.mark.model
async def test_a_repeated_prompt_reuses_its_cached_prefix(engine):
    _, first = await run(engine, "Name three colours.")
    _, again = await run(engine, "Name three colours.")
    assert again.cached_tokens == first.input_tokens - 1
    assert again.cache_write_tokens == 1


async def cache_then_run_beside_three_others(engine, max_tokens: int) -> tuple[Finished, Finished]:
    """Caches "Name three colours." and then three other prompts, one in each of the four slots
    (the others take the slots left longest ago); then runs PROMPTS[1] again with `max_tokens`
    (its reservation) while the other three prefixes sit idle; then asks the colours prompt again."""
    await asyncio.gather(*(run(engine, f"Say {word}.", max_tokens=2) for word in ("yes", "no", "maybe", "later")))
    # Shorter than the grace: every other slot still holds its "Say" prefix afterwards.
    _, first = await run(engine, "Name three colours.", max_tokens=PREFIX_GRACE_STEPS // 2)
    await asyncio.gather(*(run(engine, prompt) for prompt in PROMPTS[:3]))
    await run(engine, PROMPTS[1], max_tokens=max_tokens)
    _, again = await run(engine, "Name three colours.")
    return first, again


@pytest.mark.model
async def test_idle_prefixes_beyond_what_the_running_sequences_reserve_are_dropped(engine):
    # A 40-token request reserves less than the three idle prefixes hold together: while it
    # runs (longer than the grace), the oldest ones would only slow its attention down.
    first, again = await cache_then_run_beside_three_others(engine, max_tokens=PREFIX_GRACE_STEPS + 24)
    assert again.cached_tokens < first.input_tokens - 1


@pytest.mark.model
async def test_idle_prefixes_within_what_the_running_sequences_reserve_are_kept(engine):
    first, again = await cache_then_run_beside_three_others(engine, max_tokens=300)
    assert again.cached_tokens == first.input_tokens - 1


@pytest.mark.model
async def test_a_stopped_sequence_leaves_the_others_running(engine):
    async def stop_after_three() -> int:
        produced = 0
        stream = engine.generate(engine.render_prompt([ChatMessage("user", PROMPTS[0])]),
                                 SamplingParams(max_tokens=200, temperature=0))
        async for step in stream:
            produced += len(step) if isinstance(step, list) else isinstance(step, TextDelta)
            if produced >= 3:
                break
        await stream.aclose()
        return produced

    stopped, (text, finished) = await asyncio.gather(stop_after_three(), run(engine, PROMPTS[1], max_tokens=40))
    assert stopped >= 3
    assert finished.output_tokens > 3 and text


def long_prompts(engine) -> dict[str, list[int]]:
    """Two prompts that each reserve (with 40 output tokens) more than half of 1,024 cells."""
    prompts = {name: engine.render_prompt([ChatMessage("user", f"{name} " * 480 + "Count them.")])
               for name in ("plum", "pear")}
    assert all(512 < len(prompt) + 40 <= 1024 for prompt in prompts.values())
    return prompts


async def token_order(engine, prompts: dict[str, list[int]]) -> list[tuple[str, str]]:
    """The order in which the two long prompts' tokens and finishes arrive, run at once."""
    moments = []

    async def timed(name: str) -> None:
        async for step in engine.generate(prompts[name], SamplingParams(max_tokens=40, temperature=0)):
            moments.append((name, "finished" if isinstance(step, Finished) else "token"))

    await asyncio.gather(timed("plum"), timed("pear"))
    return moments


@pytest.mark.model
async def test_requests_whose_reservations_overflow_the_kv_pool_wait_their_turn(engine):
    # Each reserves its prompt plus 40 output tokens: one fits in the 1,024 cells, two do not.
    moments = await token_order(engine, long_prompts(engine))
    first = moments[0][0]
    assert moments.index((first, "finished")) < next(i for i, (name, _) in enumerate(moments) if name != first)


@pytest.mark.model
async def test_per_sequence_caches_decode_long_requests_together_and_keep_their_prefixes():
    engine = LlamaCppEngine(default_model_path(), "SmolLM2-135M-Instruct", context_window=1024, threads=0,
                            sequences=2, kv_cache="per_sequence")
    try:
        moments = await token_order(engine, long_prompts(engine))
        first = moments[0][0]
        # Each sequence has 1,024 cells of its own: the second starts before the first finishes.
        assert next(i for i, (name, _) in enumerate(moments) if name != first) < moments.index((first, "finished"))
        _, cold = await run(engine, "Name three colours.")
        _, warm = await run(engine, "Name three colours.")
        assert warm.cached_tokens == cold.input_tokens - 1
    finally:
        await engine.close()


@pytest.mark.model
async def test_a_step_hands_its_tokens_to_llama_cpp_in_slot_order(monkeypatch):
    # With a cache per sequence, llama.cpp splits a batch wherever sequence ids stop rising.
    import llama_cpp

    engine = LlamaCppEngine(default_model_path(), "SmolLM2-135M-Instruct", context_window=1024, threads=0,
                            sequences=4, kv_cache="per_sequence")
    try:
        await asyncio.gather(*(run(engine, prompt, max_tokens=2) for prompt in PROMPTS[:4]))  # slot k: prompt k
        real_decode, steps = llama_cpp.llama_decode, []

        def recording_decode(ctx, batch):
            steps.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
            return real_decode(ctx, batch)

        monkeypatch.setattr(llama_cpp, "llama_decode", recording_decode)
        # Each prompt goes back to its cached slot, so they arrive in the reverse of slot order.
        await asyncio.gather(*(run(engine, prompt, max_tokens=12) for prompt in reversed(PROMPTS[:4])))
    finally:
        await engine.close()
    assert any(len(set(step)) == 4 for step in steps)
    assert all(step == sorted(step) for step in steps)


def test_an_unknown_kv_cache_layout_is_refused():
    with pytest.raises(ValueError, match="kv_cache"):
        LlamaCppEngine(default_model_path(), "SmolLM2-135M-Instruct", context_window=1024, threads=0,
                       kv_cache="paged")


@pytest.mark.model
async def test_a_prompt_that_fills_the_context_finishes_at_once_with_length(engine):
    text, finished = await run(engine, "word " * 1200)
    assert (text, finished.reason, finished.output_tokens) == ("", "length", 0)


@pytest.mark.model
async def test_seeded_sampling_repeats():
    # llama.cpp's logits differ in the last bits with where in the KV cache the tokens sit (which
    # prefixes are cached, which cells are free), and a draw at temperature 1 can turn on those
    # bits: each run gets an engine fresh from the same start.
    outputs = []
    for _ in range(2):
        fresh = LlamaCppEngine(default_model_path(), "SmolLM2-135M-Instruct", context_window=1024, threads=0,
                               sequences=1)
        try:
            outputs.append((await run(fresh, PROMPTS[2], temperature=1.0, seed=42))[0])
        finally:
            await fresh.close()
    assert outputs[0] == outputs[1]


@pytest.mark.model
async def test_a_failed_decode_fails_its_requests_and_the_engine_serves_the_next(engine, monkeypatch):
    import llama_cpp

    real_decode = llama_cpp.llama_decode
    monkeypatch.setattr(llama_cpp, "llama_decode", lambda ctx, batch: -3)
    with pytest.raises(RuntimeError, match="llama_decode failed with status -3"):
        await run(engine, PROMPTS[0])
    monkeypatch.setattr(llama_cpp, "llama_decode", real_decode)
    text, finished = await run(engine, PROMPTS[0])
    assert text and finished.output_tokens > 0


# -- the shared KV pool: admission on need, growth, preemption ---------------------------------------

async def collect(engine, prompt: list[int], max_tokens: int) -> tuple[list[str], Finished]:
    texts, finished = [], None
    async for step in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0)):
        for event in step if isinstance(step, list) else [step]:
            if isinstance(event, TextDelta):
                texts.append(event.text)
            else:
                finished = event
    return texts, finished


@pytest.fixture
async def endless():
    engine = EndlessLlamaCppEngine(default_model_path(), "SmolLM2-135M-Instruct", context_window=512, threads=0,
                                   sequences=2)
    yield engine
    await engine.close()


@pytest.mark.model
async def test_a_long_generation_does_not_keep_a_short_request_waiting_for_its_budget(endless):
    """Its whole budget used to be reserved at admission: 470 of 512 cells, so a short request
    waited until it ended."""
    prompt = endless.render_prompt([ChatMessage("user", "Count.")])
    budget = 512 - len(prompt) - 8
    long_run = asyncio.create_task(collect(endless, prompt, budget))
    await asyncio.sleep(0)
    long_stats = endless.last_run
    while long_stats.produced < 20:
        await asyncio.sleep(0.01)
    _, short_finished = await collect(endless, prompt, 8)
    assert short_finished.output_tokens == 8
    assert not long_run.done() and long_stats.produced < budget - 50
    _, long_finished = await long_run
    assert long_finished.reason == "length"


@pytest.mark.model
async def test_when_the_pool_runs_out_the_largest_sequence_is_preempted_and_resumes(endless):
    prompt = endless.render_prompt([ChatMessage("user", "Count.")])
    large, small = 512 - len(prompt), 300  # together they outgrow the 512 cells before either ends
    (_, large_finished), (_, small_finished) = await asyncio.gather(
        collect(endless, prompt, large), collect(endless, prompt, small))
    assert len(endless.preempted_outputs) >= 1 and all(0 < n < large for n in endless.preempted_outputs)
    # Both ran to their budgets; the preempted one went on where it stopped, nothing repeated.
    assert (large_finished.reason, large_finished.output_tokens) == ("length", large)
    assert (small_finished.reason, small_finished.output_tokens) == ("length", small)


def tokens_in(step) -> int:
    return sum(event.tokens for event in (step if isinstance(step, list) else [step]) if isinstance(event, TextDelta))


@pytest.mark.model
async def test_a_sequence_whose_reader_stops_reading_stops_generating_and_the_others_go_on(endless):
    """Backpressure reaches the model: a sequence far ahead of its reader sits out the steps."""
    prompt = endless.render_prompt([ChatMessage("user", "Count.")])
    budget = 512 - len(prompt)  # all the context has room for, well past MAX_UNREAD_ITEMS
    stalled = endless.generate(prompt, SamplingParams(max_tokens=budget, temperature=0))
    produced = tokens_in(await anext(stalled))  # then nothing is read for a while
    stalled_stats = endless.last_run
    _, other = await collect(endless, prompt, 40)  # runs meanwhile, to its end
    assert other.output_tokens == 40
    seen = -1
    while seen != stalled_stats.produced:  # until it stops growing
        seen = stalled_stats.produced
        await asyncio.sleep(1)
    assert MAX_UNREAD_ITEMS <= stalled_stats.produced <= MAX_UNREAD_ITEMS + 2
    async for step in stalled:  # the reader is back: the rest comes
        produced += tokens_in(step)
    assert produced == budget


@pytest.mark.model
async def test_a_frequency_penalty_changes_greedy_output(engine):
    prompt = "Repeat the word 'apple' twenty times."
    plain, _ = await run(engine, prompt, max_tokens=40)
    penalised, _ = await run(engine, prompt, max_tokens=40, frequency_penalty=2.0, presence_penalty=2.0)
    assert plain != penalised
    assert penalised.lower().count("apple") < plain.lower().count("apple")


@pytest.mark.model
async def test_checking_draws_against_the_grammar_decodes_what_filtering_first_does(engine, monkeypatch):
    from parley.engine.base import Constraint
    from parley.engine.llamacpp_sampling import Sampling

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    constraints = [Constraint("json_schema", schema=schema), Constraint("json_object"),
                   Constraint("tools", mode="none"),
                   Constraint("tools", mode="required", tools=(("get_weather", {"type": "object"}),))]
    prompt = "Describe a person as JSON, or call a tool."
    refused_before = engine._sampling.refused
    checked = [await run(engine, prompt, constraint=c, max_tokens=40) for c in constraints]
    assert engine._sampling.refused > refused_before  # the JSON constraints refuse some free draws
    monkeypatch.setattr(Sampling, "grammar_first", staticmethod(lambda params: True))
    filtered = [await run(engine, prompt, constraint=c, max_tokens=40) for c in constraints]
    assert [text for text, _ in checked] == [text for text, _ in filtered]
    assert "<tool_call>" not in checked[2][0]


@pytest.mark.model
async def test_a_json_object_closes_within_its_budget(engine):
    import json

    from parley.engine.base import Constraint

    # Greedy, these prompts run past 64 tokens inside the object when the engine does not close it.
    prompts = ["Write a JSON object with 100 keys named k1 to k100, each with a long sentence as its value.",
               "Describe the history of Rome in great detail as a JSON object."]
    for prompt in prompts:
        for budget in (16, 40, 64):
            text, finished = await run(engine, prompt, constraint=Constraint("json_object"), max_tokens=budget)
            assert isinstance(json.loads(text), dict), text
            assert finished.output_tokens <= budget and finished.reason == "stop"


@pytest.mark.model
async def test_a_cached_prefix_is_reused_within_its_scope_only(engine):
    prompt = "Describe a quiet harbour at dawn."
    _, first = await run(engine, prompt, cache_scope="acme")
    _, other = await run(engine, prompt, cache_scope="globex")
    _, again = await run(engine, prompt, cache_scope="acme")
    assert other.cached_tokens == 0  # another project's prefix is never reused
    assert again.cached_tokens == first.input_tokens - 1  # its own still is


# -- a GGUF whose template renders tools -----------------------------------------------------------


def gguf_with_template(monkeypatch, template: str) -> LlamaCppEngine:
    """The llama.cpp engine on the SmolLM2 GGUF read as if its metadata carried `template` (no
    other GGUF is here)."""
    import llama_cpp

    class Retemplated(llama_cpp.Llama):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.metadata = {**self.metadata, "tokenizer.chat_template": template}

    monkeypatch.setattr(llama_cpp, "Llama", Retemplated)
    return LlamaCppEngine(default_model_path(), "SmolLM2", context_window=1024, threads=1, sequences=1)


def trtllm_on(checkpoint):
    """The TensorRT-LLM adapter (on its fake) over a checkpoint with the same template."""
    from parley import config
    from parley.engine.trtllm import TensorRTLLMEngine

    from tests.fakes import tensorrt_llm as fake

    return TensorRTLLMEngine.from_settings(config.load(environ={}, engine="tensorrt_llm", model_path=str(checkpoint),
                                                       context_window=1024), api=fake.install_api())


async def test_a_gguf_template_that_renders_tools_renders_them_as_the_tokenizer_does(
        monkeypatch, tools_checkpoint_dir):
    """The same template through llama.cpp's Jinja sandbox and through the Hugging Face tokenizer
    (the TensorRT-LLM adapter): token for token the same prompt, tools, calls and results."""
    from parley.engine.formats import tool_format
    from parley.service.conversation import to_messages

    from tests.fakes.checkpoint import TOOLS_TEMPLATE
    from tests.support.tool_turn import TOOL_TURN, WEATHER_TOOL

    engine = gguf_with_template(monkeypatch, TOOLS_TEMPLATE)
    try:
        assert engine.native_tools and engine.message_rendering is None
        messages = to_messages("Be brief.", TOOL_TURN, [WEATHER_TOOL], tool_format("hermes", native=True))
        assert engine.render_prompt(messages) == trtllm_on(tools_checkpoint_dir).render_prompt(messages)
    finally:
        await engine.close()
    refusing = gguf_with_template(monkeypatch, TOOLS_TEMPLATE.replace(
        "{%- for call in message.tool_calls -%}",
        "{{- raise_exception('no calls') -}}{%- for call in message.tool_calls -%}"))
    try:
        assert not refusing.native_tools  # the probe's call hits the refusal
    finally:
        await refusing.close()


async def test_a_gguf_template_that_turns_thinking_off_takes_effort_none(monkeypatch, thinking_checkpoint_dir):
    from tests.fakes.checkpoint import THINKING_TEMPLATE

    engine = gguf_with_template(monkeypatch, THINKING_TEMPLATE)
    trtllm = trtllm_on(thinking_checkpoint_dir)
    try:
        assert engine.reasoning_format == "think" and engine.reasoning_efforts == ("none",)
        off = [ChatMessage("developer", "", effort="none"), ChatMessage("user", "Hi")]
        assert engine.render_prompt(off) == trtllm.render_prompt(off) != trtllm.render_prompt(off[1:])
    finally:
        await engine.close()
