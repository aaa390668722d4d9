"""Tool-call formats of model families, one unit each: the markers, how tools, calls and results
are rendered into the prompt, the streaming parser, and the shape the grammar enforces
(engine/grammar.py builds its GBNF from these same fields). Prompt, grammar and parser therefore
always agree on a format; nothing else spells a marker.

An engine names its family's format (`Engine.tool_format`); the service renders and parses with
it, and an engine that constrains decoding compiles its grammar from it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from parley.engine.formats.parsing import Llama3JsonParser, MarkedCallsParser, MistralParser


def _signatures(tools: list[dict]) -> list[dict]:
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description") or "",
                                              "parameters": t.get("parameters") or {}}} for t in tools]


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    """Calls are written `calls_open (call_open OBJECT call_close) (separator ...)* calls_close`,
    OBJECT being `{"name": ..., <arguments_key>: {...}}`."""

    name: str
    marker: str            # the text that opens the calls: parser, lazy grammar and free-text grammar key on it
    calls_open: str        # once, before the first call
    call_open: str         # before each call
    call_close: str        # after each call
    separator: str         # between calls
    calls_close: str       # once, after the last call
    arguments_key: str
    parser: type[MarkedCallsParser]
    describe_tools: Callable[[list[dict]], str]  # the system-prompt text that offers the tools
    render_result: Callable[[str], str]
    results_separator: str = "\n"

    def __post_init__(self) -> None:
        if not (self.calls_open + self.call_open).startswith(self.marker):
            raise ValueError(f"{self.name}: the calls must start with the marker {self.marker!r}")

    @property
    def after_marker(self) -> str:
        """What the first call writes after the marker (the lazy grammar starts there)."""
        return (self.calls_open + self.call_open)[len(self.marker):]

    def call_prefix(self, name: str) -> str:
        """A call object up to its arguments (what the grammar and a structural tag fix)."""
        return f'{{"name": {json.dumps(name)}, "{self.arguments_key}": '

    def call_object(self, name: str, arguments: str) -> str:
        return f"{self.call_prefix(name)}{arguments}}}"

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        """One assistant turn's calls [(name, arguments JSON text)], as the model writes them."""
        return self.calls_open + self.separator.join(
            self.call_open + self.call_object(name, arguments) + self.call_close for name, arguments in calls
        ) + self.calls_close

    def render_results(self, outputs: list[str]) -> str:
        return self.results_separator.join(map(self.render_result, outputs))


def _hermes_tools(tools: list[dict]) -> str:
    signatures = "\n".join(json.dumps(signature) for signature in _signatures(tools))
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{signatures}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _llama3_tools(tools: list[dict]) -> str:
    signatures = "\n\n".join(json.dumps(signature, indent=4) for signature in _signatures(tools))
    return ("Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\nRespond in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}. '
            f"Do not use variables.\n\n{signatures}")


def _mistral_tools(tools: list[dict]) -> str:
    return f"[AVAILABLE_TOOLS]{json.dumps(_signatures(tools))}[/AVAILABLE_TOOLS]"


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

TOOL_FORMATS = {fmt.name: fmt for fmt in (HERMES, LLAMA3_JSON, MISTRAL)}


def tool_format(name: str) -> ToolFormat:
    try:
        return TOOL_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool format {name!r}; known: {', '.join(TOOL_FORMATS)}") from None


# What a chat template writes for each family's calls; the first one found names the family.
_TEMPLATE_MARKERS = (("[TOOL_CALLS]", MISTRAL.name), ("<|python_tag|>", LLAMA3_JSON.name), ("<tool_call>", HERMES.name))
HARMONY_MARKER = "<|channel|>"


def formats_of_template(template: str) -> tuple[str, str]:
    """(tool format, reasoning format) of a checkpoint's chat template: the family whose call
    markers it writes (Hermes, Parley's generic format, when it writes none), and `think` when
    it writes <think> blocks. gpt-oss's Harmony format has no parser here yet: refused."""
    if HARMONY_MARKER in template:
        raise ValueError("this checkpoint's chat template uses the Harmony format (gpt-oss), which Parley "
                         "does not parse yet")
    tools = next((name for marker, name in _TEMPLATE_MARKERS if marker in template), HERMES.name)
    return tools, "think" if "<think>" in template else "none"
