import itertools
import json

import pytest
from parley.engine.base import ChatMessage
from parley.engine.formats import HERMES, tool_format
from parley.service.conversation import body_messages, extends, to_messages

USER = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}
THOUGHT = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Use the tool."}]}
CALL = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
RESULT = {"type": "function_call_output", "call_id": "c1", "output": "sunny"}
ANSWER = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]}
TOOL = {"name": "get_weather", "description": "", "parameters": {"type": "object"}}


def test_reasoning_opens_the_assistant_turn_it_belongs_to_in_a_reasoning_family():
    messages = to_messages(None, [USER, THOUGHT, CALL, RESULT, THOUGHT, ANSWER], None, HERMES, "think")
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1].content.startswith("<think>Use the tool.</think>\n<tool_call>")
    assert messages[3].content == "<think>Use the tool.</think>\nSunny."


def test_reasoning_alone_is_a_turn_of_its_own_and_absent_from_families_without_reasoning():
    thinking = to_messages(None, [USER, THOUGHT, USER], None, HERMES, "think")
    assert [(m.role, m.content) for m in thinking][1] == ("assistant", "<think>Use the tool.</think>\n")
    plain = to_messages(None, [USER, THOUGHT, ANSWER], None, HERMES, "none")
    assert [(m.role, m.content) for m in plain] == [("user", "Weather in Paris?"), ("assistant", "Sunny.")]


def test_the_tools_are_offered_whatever_the_tool_choice():
    # to_messages is given every tool: under tool_choice none the grammar forbids calls, and the
    # prompt (so the cached prefix) is the same as under auto.
    assert "<tools>" in to_messages("Be brief.", [USER], [TOOL], HERMES)[0].content


COMPACTED = {"type": "compaction", "summary": "Earlier: the user lives in Paris."}
KINDS = [USER, THOUGHT, CALL, RESULT, ANSWER, COMPACTED]


@pytest.mark.parametrize("reasoning_format", ["none", "think"])
def test_messages_of_a_context_and_what_follows_it_are_the_two_end_to_end_wherever_extends_says(reasoning_format):
    """What a kept chain's continuation relies on (service/turn_state.py), over every context of
    up to four items cut anywhere; and extends() refuses only cuts that do render otherwise."""
    refused = 0
    for length in range(1, 5):
        for items in itertools.product(KINDS, repeat=length):
            for cut in range(length + 1):
                before, after = list(items[:cut]), list(items[cut:])
                head, end, _ = body_messages(before, HERMES, reasoning_format)
                whole = body_messages(list(items), HERMES, reasoning_format)[0]
                if extends(end, after):
                    assert head + body_messages(after, HERMES, reasoning_format)[0] == whole, (items, cut)
                else:
                    refused += 1
    assert refused  # calls, or results, on both sides of a cut; reasoning waiting for its turn


PARALLEL = {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": '{"city": "Paris"}'}
PARALLEL_RESULT = {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]}
CUSTOM_CALL = {"type": "custom_tool_call", "call_id": "c3", "name": "patch", "input": "*** Begin Patch"}
CUSTOM_RESULT = {"type": "custom_tool_call_output", "call_id": "c3", "output": "applied"}
NAMESPACED = {"type": "function_call", "call_id": "c4", "namespace": "agents", "name": "spawn", "arguments": "{}"}
AGENT_TURN = [USER, THOUGHT, CALL, PARALLEL, RESULT, PARALLEL_RESULT, CUSTOM_CALL, CUSTOM_RESULT, NAMESPACED,
              COMPACTED, THOUGHT, ANSWER, USER]


def test_for_a_template_that_renders_tools_the_messages_stay_structured():
    native = tool_format("hermes", native=True)
    messages = to_messages("Be brief.", AGENT_TURN, [TOOL], native, "think")
    system = messages[0]
    assert (system.role, system.content, json.loads(system.tools)) == ("developer", "Be brief.", [TOOL])
    calls = messages[2]
    assert calls.role == "assistant" and calls.content == "<think>Use the tool.</think>\n"
    assert calls.calls == (("c1", "get_weather", '{"city": "Paris"}'), ("c2", "get_time", '{"city": "Paris"}'))
    assert [(m.role, m.content, m.call) for m in messages[3:5]] == [
        ("tool", "sunny", ("c1", "get_weather")), ("tool", "noon", ("c2", "get_time"))]
    assert messages[5].calls == (("c3", "patch", '{"input": "*** Begin Patch"}'),)
    assert messages[7].calls == (("c4", "agents.spawn", "{}"),)
    assert "<tool_call>" not in "".join(m.content for m in messages)  # the template writes calls, not Parley
    assert to_messages(None, [USER], None, native)[0] == ChatMessage("user", "Weather in Paris?")
    assert to_messages(None, [USER], [TOOL], native)[0].content == ""  # tools without instructions


@pytest.mark.parametrize("family", ["hermes", "llama3_json", "mistral", "harmony"])
@pytest.mark.parametrize("instructions", [None, "Be brief."])
def test_structured_messages_flattened_are_what_the_family_format_renders(family, instructions):
    """What a native engine falls back on when its template refuses a conversation."""
    reasoning = "harmony" if family == "harmony" else "think"
    for length in range(1, len(AGENT_TURN) + 1):
        items = AGENT_TURN[:length]
        native = to_messages(instructions, items, [TOOL], tool_format(family, native=True), reasoning)
        assert tool_format(family).flattened(native) == to_messages(instructions, items, [TOOL], tool_format(family),
                                                                    reasoning), length
