"""Prompts measured and built from a kept state's renderings (service/prompts.py) are the
prompts rendered whole: for every cut of contexts of every shape, with and without instructions,
in families with and without reasoning."""

import random

import pytest
from parley.errors import ApiError
from parley.service.prompts import Prompts, Whole
from parley.service.validation import validate_create

from tests.fakes.engines import ScriptedEngine

USER = {"type": "message", "role": "user", "content": "What is the weather in Paris today?"}
DEVELOPER = {"type": "message", "role": "developer", "content": "Answer in one word."}
ANSWER = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny, warm."}]}
THOUGHT = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Look it up."}]}
CALL = {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Paris"}'}
RESULT = {"type": "function_call_output", "call_id": "c1", "output": "sunny and 24 degrees"}
COMPACTED = {"type": "compaction", "summary": "The user lives in Paris."}
KINDS = [USER, DEVELOPER, ANSWER, THOUGHT, CALL, RESULT, COMPACTED]


def contexts(count: int):
    rng = random.Random(5)
    for _ in range(count):
        yield [rng.choice(KINDS) for _ in range(rng.randint(1, 12))]


@pytest.mark.parametrize("reasoning_format", ["none", "think"])
@pytest.mark.parametrize("instructions", [None, "Be brief."])
def test_every_cut_of_a_kept_state_is_the_newest_items_rendered_whole(reasoning_format, instructions):
    engine = ScriptedEngine(by_message=True)
    engine.reasoning_format = reasoning_format
    prompts = Prompts(engine, engine_format())
    params = validate_create({"model": "scripted", "input": "x", **({"instructions": instructions}
                                                                    if instructions else {})}, ["scripted"])
    built = refused = 0
    for items in contexts(150):
        whole, turn = prompts.whole(params, items, [], None, frozenset())
        assert whole == engine.render_prompt(prompts.messages(params, items))
        turn = prompts._measured(turn)
        system = engine_system(params)
        for cut in range(len(items)):
            expected = engine.render_prompt(prompts.messages(params, items[cut:]))
            try:
                assert prompts._prompt_of(system, turn, cut, []) == expected, (items, cut)
                assert prompts._prompt_of(system, turn, cut, None) == len(expected), (items, cut)
                built += 1
            except Whole:  # a cut inside one message's items that would render otherwise apart
                refused += 1
    assert built > 10 * refused


def engine_format():
    from parley.engine.formats import tool_format
    return tool_format("hermes")


def engine_system(params):
    from parley.service.conversation import system_message
    return system_message(params.instructions, params.functions, engine_format())


def test_a_context_too_long_for_the_window_is_cut_where_rendering_it_whole_would_cut_it():
    engine = ScriptedEngine(context_window=80, by_message=True)
    prompts = Prompts(engine, engine_format())
    params = validate_create({"model": "scripted", "input": "x", "truncation": "auto", "max_output_tokens": 16},
                             ["scripted"])

    def outcome(items, whole, turn):
        try:
            return prompts.fit(params, items, whole, turn)[:2]
        except ApiError as error:
            return error.message

    cut = 0
    for items in contexts(400):
        whole, turn = prompts.whole(params, items, [], None, frozenset())
        kept = outcome(items, whole, turn)
        assert kept == outcome(items, whole, None), items
        cut += isinstance(kept, tuple) and kept[1] > 0
    assert cut > 50
