"""Streaming tool-call and reasoning parsers, on model outputs of three families.

The samples follow each family's documented output format (Hermes/Qwen2.5, Llama 3.1 JSON,
Mistral) and the <think> convention of Qwen3/DeepSeek-R1. They were written from those formats,
not recorded from the models (this machine cannot run them); SmolLM2's own outputs are
exercised end to end in tests/integration.
"""


import pytest
from parley.engine.formats import (
    HERMES,
    TOOL_FORMATS,
    CallArguments,
    CallEnd,
    CallStart,
    OutputParser,
    ThinkParser,
)

from tests.support.segments import run, splits, summarize

SAMPLES = {
    "hermes": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
         [("get_weather", {"city": "Paris", "unit": "c"})], ""),
        ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris", "note": "a \\"quoted\\" }"}}\n'
         '</tool_call>', [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris", "note": 'a "quoted" }'})],
         "I will check both.\n"),
        ("The answer is 4, no tools needed.", [], "The answer is 4, no tools needed."),
        ('Use < and > freely: a<b, <tool> is not a call.', [], 'Use < and > freely: a<b, <tool> is not a call.'),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})], ""),
        ('<|python_tag|>{"name": "search", "parameters": {"query": "llama {3}"}}; '
         '{"name": "get_time", "parameters": {}}', [("search", {"query": "llama {3}"}), ("get_time", {})], ""),
        ("Paris is the capital of France.", [], "Paris is the capital of France."),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
         '{"name": "get_weather", "arguments": {"city": "Rome", "days": [1, 2]}}]',
         [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "days": [1, 2]})], ""),
        ("Bonjour !", [], "Bonjour !"),
    ],
}


@pytest.mark.parametrize("family,sample,calls,text",
                         [(f, *s) for f, samples in SAMPLES.items() for s in samples])
def test_every_split_gives_the_same_calls(family, sample, calls, text):
    for pieces in splits(sample):
        got_text, _, got_calls, raw = summarize(run(OutputParser(TOOL_FORMATS[family], "none", tools=True), pieces))
        assert got_calls == calls, pieces
        assert got_text == text, pieces
        for _, arguments in raw:  # the arguments string is exactly the JSON text the model wrote
            assert arguments in sample


def test_reasoning_then_tool_call():
    sample = "<think>\nThe user wants weather. I should call the tool.\n</think>\n" \
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    for pieces in splits(sample):
        text, reasoning, calls, _ = summarize(run(OutputParser(HERMES, "think", tools=True), pieces))
        assert reasoning == "\nThe user wants weather. I should call the tool.\n"
        assert calls == [("get_weather", {"city": "Oslo"})] and text == ""


def test_reasoning_then_answer_and_no_reasoning():
    for pieces in splits("<think>2+2 is 4</think>\nIt is 4."):
        text, reasoning, _, _ = summarize(run(OutputParser(HERMES, "think", tools=False), pieces))
        assert (reasoning, text) == ("2+2 is 4", "It is 4.")
    text, reasoning, _, _ = summarize(run(OutputParser(HERMES, "think", tools=False), ["Just 4."]))
    assert (reasoning, text) == ("", "Just 4.")


def test_template_opened_think_block():
    parser = ThinkParser(starts_inside=True)
    segments = run(parser, ["weighing ", "options</th", "ink>Done."])
    assert summarize(segments)[:2] == ("Done.", "weighing options")


def test_cut_off_call_ends_with_partial_arguments():
    segments = run(OutputParser(HERMES, "none", tools=True),
                   ['<tool_call>\n{"name": "f", "arguments": {"a": "unfinish'])
    assert [type(segment) for segment in segments] == [CallStart, CallArguments, CallEnd]


@pytest.mark.parametrize("family", sorted(TOOL_FORMATS))
def test_what_a_family_renders_its_own_parser_reads_back(family):
    """Prompt and parser are one unit: calls rendered into history parse back to the same calls."""
    fmt = TOOL_FORMATS[family]
    calls = [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "Europe/Paris"}')]
    rendered = fmt.render_calls(calls)
    # Harmony's calls are assistant messages of their own; in the output, the generation prompt opened the first.
    assert rendered.startswith(fmt.marker) or fmt.channels and rendered.startswith("<|start|>assistant" + fmt.marker)
    for pieces in splits(rendered):
        text, _, parsed, raw = summarize(run(OutputParser(fmt, "none", tools=True), pieces))
        assert text == "" and [(name, arguments) for name, arguments in raw] == calls, pieces


def test_the_family_comes_from_the_chat_template():
    from parley.engine.formats import formats_of_template

    assert formats_of_template("{{ '<|python_tag|>' }}") == ("llama3_json", "none")
    assert formats_of_template("[TOOL_CALLS] ... [AVAILABLE_TOOLS]") == ("mistral", "none")
    assert formats_of_template("<tool_call> ... <think>") == ("hermes", "think")
    assert formats_of_template("{{ '<|im_start|>' + message['role'] }}") == ("hermes", "none")  # no tool support
    assert formats_of_template("<|start|>assistant<|channel|>final<|message|>") == ("harmony", "harmony")
