import itertools

import pytest
from parley.engine.formats import HERMES
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
