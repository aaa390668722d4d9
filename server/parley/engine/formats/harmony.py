"""gpt-oss's Harmony format, at the level of text: its prompt renderer and streaming parser.

Harmony is not a chat template around free text: every message names its author, its channel
(`analysis` for reasoning, `commentary` for tool calls and preambles, `final` for the answer) and
its recipient, between special tokens. `openai-harmony` renders and parses it over tokens of the
`o200k_harmony` encoding, which it downloads on first use (neither these machines nor an
air-gapped cluster can); this module works on the checkpoint's own tokenizer instead, whose added
special tokens `<|start|>`, `<|channel|>`, ... stand for the same markers as text. The engine
therefore renders Harmony itself (no chat template), decodes with special tokens kept, and stops
on `<|return|>` and `<|call|>`.

Messages reach the renderer as ChatMessages. Assistant turns and tool results that the format
rendered (calls, results, reasoning: HARMONY below) carry whole Harmony messages and pass through
as they are; any other assistant text is a `final` message.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator

from parley.engine.base import ChatMessage
from parley.engine.formats.parsing import partial_suffix
from parley.engine.formats.segments import CALL_END, CallArguments, CallStart, Reasoning, Segment, Text
from parley.engine.formats.tool_format import ToolFormat

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, RETURN, CALL = "<|constrain|>", "<|return|>", "<|call|>"
STOPS = (RETURN, CALL)  # what ends a generation: the answer given, or a call to run
MARKERS = (*STOPS, START, END, MESSAGE, CHANNEL, CONSTRAIN)
HARMONY_MARKER = CHANNEL  # what a chat template that writes Harmony has in it
FUNCTIONS = "functions"  # the namespace of the developer's functions

EFFORTS = ("low", "medium", "high")  # what gpt-oss's system message sets; medium when none is asked for
DEFAULT_EFFORT = "medium"


def system(effort: str) -> str:
    return ("You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n\n"
            f"Reasoning: {effort}\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.")


TOOLS_CHANNEL = "\nCalls to these tools must go to the commentary channel: 'functions'."
TOOLS_HEADER = "# Tools\n\n## functions\n\n"
GENERATION_PROMPT = f"{START}assistant"


def message(author: str, content: str, channel: str | None = None, end: str = END) -> str:
    return f"{START}{author}{CHANNEL + channel if channel else ''}{MESSAGE}{content}{end}"


def analysis(thought: str) -> str:
    return message("assistant", thought, "analysis") if thought else ""


def result(name: str | None, output: str) -> str:
    """A tool's result, from the called function (`functions` alone when its name is not known)."""
    author = f"{FUNCTIONS}.{name}" if name else FUNCTIONS
    return message(f"{author} to=assistant", output, "commentary")


def assistant(text: str) -> str:
    """An assistant message's text as Harmony: already rendered, or the final answer."""
    if not text or text.startswith(START):
        return text
    return message("assistant", text, "final")


def render(messages: list[ChatMessage], generation: bool) -> str:
    """A conversation as Harmony text: the system message (the reasoning effort the developer
    message asks for, the tools' channel named when it offers tools), then each message, then the
    generation prompt."""
    first = messages[0] if messages and messages[0].role == "developer" else None
    offers_tools = first is not None and TOOLS_HEADER in first.content
    effort = first.effort if first is not None and first.effort else DEFAULT_EFFORT
    parts = [message("system", system(effort) + (TOOLS_CHANNEL if offers_tools else ""))]
    for chat in messages:
        if chat.only_effort:
            continue
        if chat.role == "user":
            parts.append(message("user", chat.content))
        elif chat.role == "assistant":
            parts.append(assistant(chat.content))
        elif chat.role == "tool":
            parts.append(chat.content if chat.content.startswith(START) else result(None, chat.content))
        else:  # developer, system: the developer's instructions
            parts.append(message("developer", chat.content))
    if generation:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


# -- tools as Harmony declares them: a TypeScript namespace -----------------------------------------

def _typescript(schema: dict, indent: str = "") -> str:
    if not isinstance(schema, dict):
        return "any"
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"]) or "never"
    if "const" in schema:
        return json.dumps(schema["const"])
    for union in ("anyOf", "oneOf"):
        if union in schema:
            return " | ".join(_typescript(option, indent) for option in schema[union]) or "any"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_typescript({**schema, "type": one}, indent) for one in kind) or "any"
    if kind == "array":
        return f"{_typescript(schema.get('items') or {}, indent)}[]"
    if kind == "object" and schema.get("properties"):
        inner = indent + "  "
        return "{\n" + _properties(schema, inner) + indent + "}"
    return {"string": "string", "integer": "number", "number": "number", "boolean": "boolean",
            "null": "null", "object": "object"}.get(kind, "any")


def _properties(schema: dict, indent: str) -> str:
    required = set(schema.get("required") or ())
    lines = []
    for name, spec in (schema.get("properties") or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        if spec.get("description"):
            lines.append(f"{indent}// {spec['description']}\n")
        optional = "" if name in required else "?"
        default = f" // default: {json.dumps(spec['default'])}" if "default" in spec else ""
        lines.append(f"{indent}{name}{optional}: {_typescript(spec, indent)},{default}\n")
    return "".join(lines)


def describe_tools(tools: list[dict]) -> str:
    lines = [TOOLS_HEADER, f"namespace {FUNCTIONS} {{\n\n"]
    for tool in tools:
        if tool.get("description"):
            lines.append(f"// {tool['description']}\n")
        parameters = tool.get("parameters") or {}
        if parameters.get("properties"):
            lines.append(f"type {tool['name']} = (_: {{\n{_properties(parameters, '')}}}) => any;\n\n")
        else:
            lines.append(f"type {tool['name']} = () => any;\n\n")
    lines.append(f"}} // namespace {FUNCTIONS}")
    return "".join(lines)


@dataclasses.dataclass(frozen=True)
class HarmonyFormat(ToolFormat):
    """Harmony's calls as a ToolFormat. A call is one message to `functions.NAME` on the
    commentary channel, its arguments bare JSON, ended by `<|call|>`, which also ends the
    generation: one call per turn. In the prompt each call is its own assistant message and each
    result a message from `functions.NAME` (the call's name, so results are rendered with names)."""

    def call_prefix(self, name: str) -> str:
        return f"{name} {CONSTRAIN}json{MESSAGE}"

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        return "".join(f"{START}assistant{self.call_open}{self.call_object(name, arguments)}{self.call_close}"
                       for name, arguments in calls)

    def render_results(self, results: list[tuple[str | None, str]]) -> str:
        return "".join(result(name, output) for name, output in results)


_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")
HEADER_LIMIT = 512  # characters of a header without <|message|>: the model is writing plain text


class HarmonyParser:
    """Harmony output, as it streams (the generation prompt already opened the first assistant
    message): `analysis` is Reasoning; `final`, and commentary to no one (a preamble), Text; a
    message to `functions.NAME` a call (CallStart, its arguments, CallEnd). With tools not
    offered, a call's message is shown as text, as other families leave unoffered call markup."""

    TERMINATORS = (END, CALL, RETURN)

    def __init__(self, fmt: ToolFormat | None = None, tools: bool = True):
        self._tools = tools
        self._buffer = ""
        self._state = "header"  # header -> body -> between -> header ...
        self._kind = "text"     # the open message: text, reasoning or call

    @property
    def inside(self) -> bool:
        """Whether the model is writing reasoning right now."""
        return self._kind == "reasoning"

    def feed(self, delta: str) -> Iterator[Segment]:
        self._buffer += delta
        while (yield from self._step()):
            pass

    def finish(self) -> Iterator[Segment]:
        if self._state == "body":
            if self._buffer:
                yield self._segment(self._buffer)
            if self._kind == "call":
                yield CALL_END
        elif self._state == "header" and self._buffer and "<|" not in self._buffer:
            yield Text(self._buffer)  # no markup at all: the model answered in plain text
        self._buffer = ""

    def _segment(self, text: str) -> Segment:
        return Reasoning(text) if self._kind == "reasoning" else CallArguments(text) if self._kind == "call" \
            else Text(text)

    def _step(self):
        if self._state == "header":
            at = self._buffer.find(MESSAGE)
            if at < 0:
                if len(self._buffer) > HEADER_LIMIT and "<|" not in self._buffer:
                    self._state, self._kind = "body", "text"
                    return True
                return False
            header, self._buffer = self._buffer[:at], self._buffer[at + len(MESSAGE):]
            channel = _CHANNEL_NAME.search(header)
            recipient = _RECIPIENT.search(header)
            self._state = "body"
            if recipient is not None and self._tools:
                name = recipient.group(1)
                self._kind = "call"
                yield CallStart(name.removeprefix(FUNCTIONS + "."))
            elif recipient is None and channel is not None and channel.group(1) == "analysis":
                self._kind = "reasoning"
            else:
                self._kind = "text"
            return True
        if self._state == "body":
            found = [(at, marker) for marker in self.TERMINATORS if (at := self._buffer.find(marker)) >= 0]
            if not found:
                keep = max(partial_suffix(self._buffer, marker) for marker in self.TERMINATORS)
                emit = self._buffer[:len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep:]
                if emit:
                    yield self._segment(emit)
                return False
            at, marker = min(found)
            if at:
                yield self._segment(self._buffer[:at])
            if self._kind == "call":
                yield CALL_END
            self._buffer = self._buffer[at + len(marker):]
            self._state, self._kind = "between", "text"
            return True
        # between messages: the next one's <|start|>, then its header
        stripped = self._buffer.lstrip()
        if not stripped or (len(stripped) < len(START) and START.startswith(stripped)):
            return False
        self._buffer = stripped[len(START):] if stripped.startswith(START) else stripped
        self._state = "header"
        return True


HARMONY = HarmonyFormat(
    name="harmony", marker=f"{CHANNEL}commentary to={FUNCTIONS}.", calls_open="",
    call_open=f"{CHANNEL}commentary to={FUNCTIONS}.", call_close=CALL, separator="", calls_close="",
    arguments_key="arguments", parser=HarmonyParser, describe_tools=describe_tools, render_result=lambda output: output,
    call_suffix="", calls_per_turn=1, results_role="tool", results_named=True,
    instructions_header="# Instructions\n\n", channels=True, efforts=EFFORTS)
