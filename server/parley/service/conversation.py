"""Conversation assembly: stored history + new input + instructions + tools -> chat messages.

Tools, tool calls and tool results are rendered as text in the engine family's tool format
(engine/formats/families.py), so a model whose chat template has no tool support (SmolLM2) still
sees them, in the very format its grammar and parser expect. Consecutive calls (parallel calls)
form one assistant turn; consecutive results, one user turn. Reasoning items carry nothing the
next turn's prompt uses (templates of reasoning families drop earlier reasoning), so they are
skipped.
"""

from __future__ import annotations

from itertools import groupby

from parley.engine.base import ChatMessage
from parley.engine.formats import ToolFormat


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or part.get("refusal") or "" for part in content)


def to_messages(instructions: str | None, items: list[dict], tools: list[dict] | None,
                tool_format: ToolFormat) -> list[ChatMessage]:
    system = instructions or ""
    if tools:
        offered = tool_format.describe_tools(tools)
        system = f"{system}\n\n{offered}" if system else offered
    messages = [ChatMessage("developer", system)] if system else []
    for kind, group in groupby(items, key=lambda item: item["type"]):
        if kind == "message":
            messages += [ChatMessage(item["role"], _text_of(item["content"])) for item in group]
        elif kind == "function_call":
            calls = [(item["name"], item["arguments"]) for item in group]
            messages.append(ChatMessage("assistant", tool_format.render_calls(calls)))
        elif kind == "function_call_output":
            outputs = [_text_of(item["output"]) for item in group]
            messages.append(ChatMessage("user", tool_format.render_results(outputs)))
    return messages
