"""Conversation assembly: stored history + new input + instructions + tools -> chat messages.

Tools, tool calls and tool results are rendered as text in Parley's documented generic format
(engine/formats.py: Hermes-style <tools>, <tool_call>, <tool_response>), so a model whose chat
template has no tool support (SmolLM2) still sees them. Reasoning items carry nothing the next
turn's prompt uses (templates of reasoning families drop earlier reasoning), so they are skipped.
"""

from __future__ import annotations

from parley.engine.base import ChatMessage
from parley.engine.formats import render_call, render_result, render_tools_system


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or part.get("refusal") or "" for part in content)


def to_messages(instructions: str | None, items: list[dict], tools: list[dict] | None = None) -> list[ChatMessage]:
    system = instructions or ""
    if tools:
        system = f"{system}\n\n{render_tools_system(tools)}" if system else render_tools_system(tools)
    messages = [ChatMessage("developer", system)] if system else []
    for item in items:
        kind = item["type"]
        if kind == "message":
            messages.append(ChatMessage(item["role"], _text_of(item["content"])))
        elif kind == "function_call":
            call = render_call(item["name"], item["arguments"])
            if messages and messages[-1].role == "assistant" and messages[-1].content.endswith("</tool_call>"):
                messages[-1] = ChatMessage("assistant", f"{messages[-1].content}\n{call}")  # parallel calls
            else:
                messages.append(ChatMessage("assistant", call))
        elif kind == "function_call_output":
            result = render_result(_text_of(item["output"]))
            if messages and messages[-1].role == "user" and messages[-1].content.endswith("</tool_response>"):
                messages[-1] = ChatMessage("user", f"{messages[-1].content}\n{result}")
            else:
                messages.append(ChatMessage("user", result))
    return messages
