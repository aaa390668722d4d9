"""Tool-call formats of model families, one unit each: the markers, how tools, calls and results
are rendered into the prompt, the streaming parser, and the shape the grammar enforces
(engine/grammar.py builds its GBNF from these same fields). Prompt, grammar and parser therefore
always agree on a format; nothing else spells a marker.

An engine names its family's format (`Engine.tool_format`); the service renders and parses with
it, and an engine that constrains decoding compiles its grammar from it. gpt-oss's Harmony, a
format of channels rather than markers in free text, has its own module (harmony.py).
"""

from __future__ import annotations

import dataclasses
import json

from parley.engine.formats import harmony
from parley.engine.formats.harmony import HARMONY, HARMONY_MARKER
from parley.engine.formats.parsing import THINK_CLOSE, THINK_OPEN, Llama3JsonParser, MarkedCallsParser, MistralParser
from parley.engine.formats.tool_format import ToolFormat, function_signatures


def _hermes_tools(tools: list[dict]) -> str:
    signatures = "\n".join(json.dumps(signature) for signature in function_signatures(tools))
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{signatures}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _llama3_tools(tools: list[dict]) -> str:
    signatures = "\n\n".join(json.dumps(signature, indent=4) for signature in function_signatures(tools))
    return ("Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\nRespond in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}. '
            f"Do not use variables.\n\n{signatures}")


def _mistral_tools(tools: list[dict]) -> str:
    return f"[AVAILABLE_TOOLS]{json.dumps(function_signatures(tools))}[/AVAILABLE_TOOLS]"


# Hermes/Qwen style: Parley's generic format, for templates without tool support (SmolLM2).
HERMES = ToolFormat(
    name="hermes", marker="<tool_call>", calls_open="", call_open="<tool_call>\n", call_close="\n</tool_call>",
    separator="\n", calls_close="", arguments_key="arguments", parser=MarkedCallsParser,
    describe_tools=_hermes_tools, render_result=lambda output: f"<tool_response>\n{output}\n</tool_response>")

# Llama 3.1 / 3.2 JSON tool calls (Meta's documented zero-shot format).
LLAMA3_JSON = ToolFormat(
    name="llama3_json", marker="<|python_tag|>", calls_open="<|python_tag|>", call_open="", call_close="",
    separator="; ", calls_close="", arguments_key="parameters", parser=Llama3JsonParser,
    describe_tools=_llama3_tools, render_result=lambda output: output)

# Mistral (v3 tokenizer and later).
MISTRAL = ToolFormat(
    name="mistral", marker="[TOOL_CALLS]", calls_open="[TOOL_CALLS][", call_open="", call_close="",
    separator=", ", calls_close="]", arguments_key="arguments", parser=MistralParser,
    describe_tools=_mistral_tools,
    render_result=lambda output: f"[TOOL_RESULTS]{json.dumps({'content': output})}[/TOOL_RESULTS]")

TOOL_FORMATS = {fmt.name: fmt for fmt in (HERMES, LLAMA3_JSON, MISTRAL, HARMONY)}


def tool_format(name: str, native: bool = False, efforts: tuple[str, ...] = ()) -> ToolFormat:
    """The format named `name`; `native`: for an engine whose template renders tools itself;
    `efforts`: reasoning efforts the engine's template sets, beside the format's own."""
    try:
        fmt = TOOL_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool format {name!r}; known: {', '.join(TOOL_FORMATS)}") from None
    return dataclasses.replace(fmt, native=native, efforts=fmt.efforts + tuple(efforts)) if native or efforts else fmt


# What a chat template writes for each family's calls; the first one found names the family.
_TEMPLATE_MARKERS = (("[TOOL_CALLS]", MISTRAL.name), ("<|python_tag|>", LLAMA3_JSON.name), ("<tool_call>", HERMES.name))


def formats_of_template(template: str) -> tuple[str, str]:
    """(tool format, reasoning format) of a checkpoint's chat template: the family whose call
    markers it writes (Hermes, Parley's generic format, when it writes none), and `think` when
    it writes <think> blocks; a template that writes Harmony's channels (gpt-oss) is Harmony in
    both (harmony.py)."""
    if HARMONY_MARKER in template:
        return HARMONY.name, HARMONY.name
    tools = next((name for marker, name in _TEMPLATE_MARKERS if marker in template), HERMES.name)
    return tools, "think" if "<think>" in template else "none"


def with_reasoning(reasoning_format: str, thought: str, text: str) -> str:
    """An assistant turn's text (its answer or its calls, as rendered) opened by the reasoning
    that led to it, as the family writes reasoning: a <think> block, or Harmony's analysis message."""
    if reasoning_format == HARMONY.name:
        return harmony.analysis(thought) + harmony.assistant(text)
    return f"{THINK_OPEN}{thought}{THINK_CLOSE}\n{text}"
