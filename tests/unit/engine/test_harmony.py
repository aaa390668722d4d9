"""gpt-oss's Harmony format at the level of text: the prompt the renderer writes for a whole
agent turn (instructions, tools, reasoning, a call, its result), the streaming parser over the
output shapes OpenAI's Harmony guide documents (analysis then final, analysis then a call, the
recipient in the role, a preamble, plain text, a cut-off call), and the grammar's shape.

The outputs were written from the published format (no gpt-oss model can run here)."""

import pytest
from parley.engine.base import ChatMessage, Constraint
from parley.engine.formats import HARMONY, HERMES, CallArguments, CallEnd, CallStart, OutputParser, Reasoning, harmony
from parley.engine.grammar import compile_constraint
from parley.service.conversation import to_messages

from tests.support.segments import run, splits, summarize

WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "required": ["city"], "properties": {
               "city": {"type": "string", "description": "The city's name."},
               "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
               "days": {"type": "array", "items": {"type": "integer"}}}}}

TURN = [
    {"type": "message", "role": "user", "content": "Weather in Paris?"},
    {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "I need the tool."}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": '{"celsius": 21}'},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "21 °C."}]},
    {"type": "message", "role": "user", "content": "Thanks!"},
]

RENDERED = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
    "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
    "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Tools\n\n## functions\n\nnamespace functions {\n\n"
    "// Current weather in a city.\ntype get_weather = (_: {\n// The city's name.\ncity: string,\n"
    'unit?: "c" | "f", // default: "c"\ndays?: number[],\n}) => any;\n\n} // namespace functions<|end|>'
    "<|start|>user<|message|>Weather in Paris?<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>I need the tool.<|end|>"
    '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}'
    "<|call|>"
    '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"celsius": 21}<|end|>'
    "<|start|>assistant<|channel|>final<|message|>21 °C.<|end|>"
    "<|start|>user<|message|>Thanks!<|end|>"
    "<|start|>assistant")


def test_a_whole_agent_turn_renders_as_harmony_messages():
    messages = to_messages("Be brief.", TURN, [WEATHER], HARMONY, "harmony")
    assert harmony.render(messages, True) == RENDERED


def test_the_reasoning_effort_asked_for_is_the_system_message_s_and_medium_otherwise():
    high = to_messages("Be brief.", TURN, [WEATHER], HARMONY, "harmony", effort="high")
    assert harmony.render(high, True) == RENDERED.replace("Reasoning: medium", "Reasoning: high", 1)
    assert harmony.render(to_messages(None, TURN, [WEATHER], HARMONY, "harmony", effort="medium"), True) == \
        harmony.render(to_messages(None, TURN, [WEATHER], HARMONY, "harmony"), True)
    alone = to_messages(None, TURN[:1], None, HARMONY, "harmony", effort="low")
    assert alone[0] == ChatMessage("developer", "", effort="low")  # the effort, with no instructions or tools
    text = harmony.render(alone, True)
    assert "Reasoning: low" in text and "<|start|>developer" not in text
    assert to_messages(None, TURN[:1], None, HERMES, "think", effort="low")[0].role == "user"  # no prompt of its own


def test_a_result_names_its_call_and_one_whose_call_is_not_in_the_context_is_from_functions():
    known = to_messages(None, TURN[2:4], None, HARMONY, "harmony")
    assert known[-1] == ChatMessage("tool", "<|start|>functions.get_weather to=assistant<|channel|>commentary"
                                            '<|message|>{"celsius": 21}<|end|>')
    orphan = to_messages(None, TURN[3:4], None, HARMONY, "harmony")
    assert orphan[-1].content.startswith("<|start|>functions to=assistant<|channel|>commentary")


def test_without_tools_the_system_message_names_no_tool_channel_and_plain_text_is_final():
    text = harmony.render([ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello")], False)
    assert "Calls to these tools" not in text and "<|start|>developer" not in text
    assert text.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello<|end|>")


OUTPUTS = {
    "analysis then final": (
        "<|channel|>analysis<|message|>The user greets; answer <b>kindly</b>.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello! a<|b is fine.<|return|>",
        "Hello! a<|b is fine.", "The user greets; answer <b>kindly</b>.", []),
    "analysis then a call": (
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "note": "<|end|-ish"}<|call|>',
        "", "Need the weather.", [("get_weather", '{"city": "Paris", "note": "<|end|-ish"}')]),
    "recipient in the role": (
        '<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.lookup<|channel|>commentary json'
        '<|message|>{"q": 1}<|call|>', "", "x", [("lookup", '{"q": 1}')]),
    "a preamble before the call": (
        "<|channel|>commentary<|message|>Checking two sources.<|end|><|start|>assistant<|channel|>commentary "
        "to=functions.search <|constrain|>json<|message|>{}<|call|>", "Checking two sources.", "", [("search", "{}")]),
    "no markup at all": ("Just text, no channels.", "Just text, no channels.", "", []),
    "the stop token left out": (
        "<|channel|>final<|message|>Done.", "Done.", "", []),
}


@pytest.mark.parametrize("output,text,reasoning,calls", OUTPUTS.values(), ids=OUTPUTS)
def test_the_parser_reads_every_documented_output_shape_however_it_is_split(output, text, reasoning, calls):
    for pieces in splits(output):
        got_text, got_reasoning, _, raw = summarize(run(OutputParser(HARMONY, "harmony", tools=True), pieces))
        assert (got_text, got_reasoning, [tuple(call) for call in raw]) == (text, reasoning, calls), pieces


def test_the_note_inside_arguments_that_looks_like_a_marker_is_not_one():
    # "<|end|-ish" is not "<|end|>": the arguments run to <|call|>.
    _, _, parsed, _ = summarize(run(OutputParser(HARMONY, "harmony", tools=True),
                                    [OUTPUTS["analysis then a call"][0]]))
    assert parsed == [("get_weather", {"city": "Paris", "note": "<|end|-ish"})]


def test_a_cut_off_call_ends_with_its_partial_arguments_and_reasoning_is_followed():
    parser = OutputParser(HARMONY, "harmony", tools=True)
    seen = []
    for piece in ["<|channel|>analysis", "<|message|>", "hm", "<|end|>", "<|start|>assistant<|channel|>commentary",
                  " to=functions.f <|constrain|>json<|message|>", '{"a": "unfin']:
        segments = list(parser.feed(piece))
        seen.append(parser.reasoning)
        if piece == "hm":
            assert segments == [Reasoning("hm")]
    assert seen == [False, True, True, False, False, False, False]
    tail = list(parser.finish())
    assert tail == [CallEnd()]


def test_with_no_tools_offered_a_call_message_is_text_not_a_call():
    segments = run(OutputParser(HARMONY, "harmony", tools=False),
                   ['<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}<|call|>'])
    assert not any(isinstance(segment, CallStart | CallArguments) for segment in segments)
    assert summarize(segments)[0] == '{"a": 1}'
    assert not OutputParser(HARMONY, "harmony", tools=False).plain  # channels are parsed even without tools


def test_the_grammar_allows_analysis_then_one_call_or_the_final_answer():
    tools = (("get_weather", WEATHER["parameters"]),)
    required = compile_constraint(Constraint("tools", tools=tools, mode="required"), HARMONY)
    assert 'root ::= analysis? ( calls )' in required
    assert 'call ::= "<|channel|>commentary to=functions." object "<|call|>"' in required
    assert '"get_weather <|constrain|>json<|message|>"' in required
    assert "{0," not in required  # one call per turn: <|call|> ends the generation
    answer = compile_constraint(Constraint("json_schema", schema={"type": "object"}), HARMONY)
    assert 'root ::= analysis? ( "<|channel|>final<|message|>" answer "<|return|>" )' in answer
    auto = compile_constraint(Constraint("tools", tools=tools, mode="auto", schema={"type": "object"}), HARMONY)
    assert 'root ::= analysis? ( calls | "<|channel|>final<|message|>" answer "<|return|>" )' in auto
    none = compile_constraint(Constraint("tools", tools=tools, mode="none"), HARMONY)
    assert "calls" not in none.split("root ::=")[1]

