"""Structured messages as Hugging Face chat messages, for templates that render tools themselves."""

import json
import re

from parley.engine.base import ChatMessage
from parley.engine.template_tools import call_id_for_template, structured_chat

TOOLS = json.dumps([{"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object"}}])


def test_calls_carry_their_arguments_as_a_mapping_and_results_their_call():
    chat, tools = structured_chat([
        ChatMessage("developer", "Be brief.", tools=TOOLS), ChatMessage("user", "Weather?"),
        ChatMessage("assistant", "<think>x</think>\n", calls=(("call_1", "get_weather", '{"city": "Oslo"}'),
                                                           ("call_2", "patch", "not json"), ("call_3", "f", "[1]"))),
        ChatMessage("tool", "sunny", call=("call_1", "get_weather")), ChatMessage("tool", "?", call=("call_9", None))])
    assert tools == [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                       "parameters": {"type": "object"}}}]
    assert chat[0] == {"role": "system", "content": "Be brief."}
    calls = chat[2]["tool_calls"]
    assert [call["function"]["arguments"] for call in calls] == [{"city": "Oslo"}, "not json", "[1]"]
    assert chat[2]["content"] == "<think>x</think>\n"
    assert chat[3] == {"role": "tool", "content": "sunny", "tool_call_id": calls[0]["id"], "name": "get_weather"}
    assert "name" not in chat[4]  # a result whose call is no longer in the context


def test_tools_alone_leave_the_system_prompt_to_the_template():
    chat, tools = structured_chat([ChatMessage("developer", "", tools=TOOLS), ChatMessage("user", "Hi")])
    assert chat == [{"role": "user", "content": "Hi"}] and tools


def test_call_ids_are_nine_letters_or_digits_the_same_each_turn_and_apart_for_different_calls():
    ids = {call_id_for_template(f"call_{index}") for index in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"[a-zA-Z0-9]{9}", value) for value in ids)
    assert call_id_for_template("call_1") == call_id_for_template("call_1")
