"""Conversation assembly: stored history + new input + instructions + tools -> chat messages.

Tools, tool calls and tool results are rendered as text in the engine family's tool format
(engine/formats/families.py), so a model whose chat template has no tool support (SmolLM2) still
sees them, in the very format its grammar and parser expect. Consecutive calls (parallel calls)
form one assistant turn; consecutive results, one user turn.

Reasoning items reach the prompt of a reasoning family as the `<think>` block that opens the
assistant turn they belong to (the next assistant message or calls), which is how such a model
wrote them: stateless multi-turn (`encrypted_content` sent back) depends on it. A family without
reasoning has no place for them in its template, so there they are left out.

A compaction item (service/compaction.py, opened: its `summary` readable) stands for the
conversation it replaced: a user message that carries the summary.
"""

from __future__ import annotations

import json
from itertools import groupby

from parley.engine.base import ChatMessage
from parley.engine.formats import THINK_CLOSE, THINK_OPEN, ToolFormat
from parley.service.tools import CUSTOM_INPUT

COMPACTED_PREFIX = "Summary of the conversation before this point:\n"


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if len(content) == 1:  # the usual case, on every item of every turn's whole context
        part = content[0]
        return part.get("text") or part.get("refusal") or ""
    return "".join(part.get("text") or part.get("refusal") or "" for part in content)


# Calls of one assistant turn, function or custom alike, render together; so do their results.
TURN_OF = {"function_call": "calls", "custom_tool_call": "calls", "function_call_output": "results",
           "custom_tool_call_output": "results"}


def _call(call: dict) -> tuple[str, str]:
    """(name, arguments JSON) as the model wrote the call: a namespaced function as
    `namespace.name`, a custom tool's input as its one argument (service/tools.py)."""
    if call["type"] == "custom_tool_call":
        return call["name"], json.dumps({CUSTOM_INPUT: call["input"]})
    return (f"{call['namespace']}.{call['name']}" if call.get("namespace") else call["name"]), call["arguments"]


def reasoning_text(item: dict) -> str:
    """What a reasoning item says: its reasoning text, else its summary."""
    return _text_of(item.get("content") or []) or _text_of(item.get("summary") or [])


def to_messages(instructions: str | None, items: list[dict], tools: list[dict] | None,
                tool_format: ToolFormat, reasoning_format: str = "none",
                reasoning_turns: str = "all_turns") -> list[ChatMessage]:
    """`reasoning_turns` (the request's reasoning.context): `all_turns` shows every reasoning
    item; `current_turn` only those after the last user message."""
    if reasoning_turns == "current_turn":
        last_user = max((index for index, item in enumerate(items)
                         if item["type"] == "message" and item["role"] == "user"), default=-1)
        items = [item for index, item in enumerate(items) if item["type"] != "reasoning" or index > last_user]
    system = system_message(instructions, tools, tool_format)
    return [*((system,) if system else ()), *body_messages(items, tool_format, reasoning_format)[0]]


def system_message(instructions: str | None, tools: list[dict] | None, tool_format: ToolFormat) -> ChatMessage | None:
    """The instructions and the tools offered, as the conversation's first message (if any)."""
    system = instructions or ""
    if tools:
        offered = tool_format.describe_tools(tools)
        system = f"{system}\n\n{offered}" if system else offered
    return ChatMessage("developer", system) if system else None


# Kinds whose consecutive items make one message: items of one of them on both sides of a cut
# render otherwise than the two sides rendered apart.
MERGING = frozenset({"calls", "results"})


def body_messages(items: list[dict], tool_format: ToolFormat, reasoning_format: str) -> tuple[list[ChatMessage], str | None]:
    """The messages of `items` (no system message), and where they end: the kind of the last
    item ("" for none), or None when a reasoning item still waits for the assistant turn it
    opens (messages of later items would then not simply follow these)."""
    messages: list[ChatMessage] = []
    thought = ""  # reasoning waiting for the assistant turn it opens

    def assistant(text: str) -> ChatMessage:
        nonlocal thought
        if thought:
            text, thought = f"{THINK_OPEN}{thought}{THINK_CLOSE}\n{text}", ""
        return ChatMessage("assistant", text)

    kind = ""
    for kind, grouped in groupby(items, key=lambda item: TURN_OF.get(item["type"], item["type"])):
        group = list(grouped)
        if kind == "reasoning":
            if reasoning_format == "think":
                thought += "\n".join(filter(None, map(reasoning_text, group)))
            continue
        if thought and not (kind == "calls" or (kind == "message" and group[0]["role"] == "assistant")):
            messages.append(assistant(""))  # the turn was reasoning alone
        if kind == "compaction":
            messages += [ChatMessage("user", COMPACTED_PREFIX + item["summary"]) for item in group]
        elif kind == "message":
            messages += [assistant(_text_of(item["content"])) if item["role"] == "assistant"
                         else ChatMessage(item["role"], _text_of(item["content"])) for item in group]
        elif kind == "calls":
            messages.append(assistant(tool_format.render_calls([_call(item) for item in group])))
        elif kind == "results":
            outputs = [_text_of(item["output"]) for item in group]
            messages.append(ChatMessage("user", tool_format.render_results(outputs)))
    if thought:
        messages.append(assistant(""))
        return messages, None
    return messages, kind


def extends(end: str | None, items: list[dict]) -> bool:
    """Whether the messages of `items` simply follow those of a context that ended at `end`
    (body_messages): the messages of both together are the two lists end to end."""
    return end is not None and not (items and end in MERGING and TURN_OF.get(items[0]["type"]) == end)
