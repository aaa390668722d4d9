"""What a model family's tool-call format is made of (families.py and harmony.py hold the formats)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from parley.engine.base import ChatMessage


def function_signatures(tools: list[dict]) -> list[dict]:
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description") or "",
                                              "parameters": t.get("parameters") or {}}} for t in tools]


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    """Calls are written `calls_open (call_open OBJECT call_close) (separator ...)* calls_close`,
    OBJECT being `call_prefix(name) ARGUMENTS call_suffix`: `{"name": ..., <arguments_key>: {...}}`
    in the JSON families."""

    name: str
    marker: str            # the text that opens the calls: parser, lazy grammar and free-text grammar key on it
    calls_open: str        # once, before the first call
    call_open: str         # before each call
    call_close: str        # after each call
    separator: str         # between calls
    calls_close: str       # once, after the last call
    arguments_key: str
    parser: type[Any]      # the streaming parser: parser(fmt) for the answer text, parser(fmt, tools) with channels
    describe_tools: Callable[[list[dict]], str]  # the system-prompt text that offers the tools
    render_result: Callable[[str], str]
    results_separator: str = "\n"
    call_suffix: str = "}"  # what closes a call object after its arguments
    calls_per_turn: int | None = None  # a format whose calls end the generation allows one
    results_role: str = "user"  # the role of the message that carries results
    results_named: bool = False  # whether a result is rendered with its call's function name
    instructions_header: str = ""  # what precedes the instructions in the developer message
    # Whether the whole output is messages on channels (Harmony): its parser reads reasoning too,
    # and the engine renders the prompt with the format's own renderer.
    channels: bool = False
    # Whether the engine's chat template renders tools, calls and results itself (native_tools):
    # the conversation then builds structured messages (ChatMessage's tool fields), not this
    # format's text. Parser and grammar are the same either way: the model writes the family's calls.
    native: bool = False
    # The reasoning efforts the format's prompt can set (Harmony's system message); () for none.
    efforts: tuple[str, ...] = ()

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
        return f"{self.call_prefix(name)}{arguments}{self.call_suffix}"

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        """One assistant turn's calls [(name, arguments JSON text)], as the model writes them."""
        return self.calls_open + self.separator.join(
            self.call_open + self.call_object(name, arguments) + self.call_close for name, arguments in calls
        ) + self.calls_close

    def render_results(self, results: list[tuple[str | None, str]]) -> str:
        """One turn's results [(the called function's name, if known; output)]."""
        return self.results_separator.join(self.render_result(output) for _, output in results)

    def system_text(self, instructions: str | None, tools: list[dict] | None) -> str:
        """The developer message: the instructions, then the tools offered ("" for neither)."""
        system = self.instructions_header + instructions if instructions else ""
        if tools:
            offered = self.describe_tools(tools)
            system = f"{system}\n\n{offered}" if system else offered
        return system

    def flattened(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """Structured messages (built for a native-tools template) as this format writes them,
        which is what the conversation builds for an engine without native tools: the tools in
        the developer message, a turn's calls after its text, consecutive results one message."""
        flat: list[ChatMessage] = []
        results: list[tuple[str | None, str]] = []
        for message in messages:
            if results and message.call is None:
                flat.append(ChatMessage(self.results_role, self.render_results(results)))
                results = []
            if message.tools:
                text = self.system_text(message.content, json.loads(message.tools))
                flat.append(message._replace(content=text, tools=""))
            elif message.calls:
                calls = [(name, arguments) for _, name, arguments in message.calls]
                flat.append(message._replace(content=message.content + self.render_calls(calls), calls=()))
            elif message.call is not None:
                results.append((message.call[1], message.content))
            else:
                flat.append(message)
        if results:
            flat.append(ChatMessage(self.results_role, self.render_results(results)))
        return flat
