"""Conversation assembly: stored history + new input + instructions + tools -> chat messages.

Tools, tool calls and tool results are rendered as text in the engine family's tool format
(engine/formats/families.py), so a model whose chat template has no tool support (SmolLM2) still
sees them, in the very format its grammar and parser expect. Consecutive calls (parallel calls)
form one assistant turn; consecutive results, one user turn. For an engine whose template renders
tools itself (a native ToolFormat), they stay structured instead: the tools on the developer
message, the calls on their assistant message, one tool message per result; the template writes
them (ToolFormat.flattened turns such messages into the text form, the same as built here).

Reasoning items reach the prompt of a reasoning family as the `<think>` block (Harmony: the
analysis message) that opens the assistant turn they belong to (the next assistant message or
calls), which is how such a model wrote them: stateless multi-turn (`encrypted_content` sent
back) depends on it. A family without reasoning has no place for them in its template, so there
they are left out.

A compaction item (service/compaction.py, opened: its `summary` readable) stands for the
conversation it replaced: a user message that carries the summary.
"""

from __future__ import annotations

import json
from itertools import groupby
from typing import NamedTuple

from parley.engine.base import ChatMessage
from parley.engine.formats import ToolFormat, with_reasoning
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


def _call_names(items: list[dict]) -> dict[str, str]:
    return {item["call_id"]: _call(item)[0] for item in items if TURN_OF.get(item["type"]) == "calls"}


def reasoning_text(item: dict) -> str:
    """What a reasoning item says: its reasoning text, else its summary."""
    return _text_of(item.get("content") or []) or _text_of(item.get("summary") or [])


def to_messages(instructions: str | None, items: list[dict], tools: list[dict] | None,
                tool_format: ToolFormat, reasoning_format: str = "none",
                reasoning_turns: str = "all_turns", effort: str | None = None) -> list[ChatMessage]:
    """`reasoning_turns` (the request's reasoning.context): `all_turns` shows every reasoning
    item; `current_turn` only those after the last user message. `effort`: the reasoning effort
    asked for, which a format with `efforts` sets in its prompt."""
    if reasoning_turns == "current_turn":
        last_user = max((index for index, item in enumerate(items)
                         if item["type"] == "message" and item["role"] == "user"), default=-1)
        items = [item for index, item in enumerate(items) if item["type"] != "reasoning" or index > last_user]
    system = system_message(instructions, tools, tool_format, effort)
    return [*((system,) if system else ()), *body_messages(items, tool_format, reasoning_format)[0]]


def system_message(instructions: str | None, tools: list[dict] | None, tool_format: ToolFormat,
                   effort: str | None = None) -> ChatMessage | None:
    """The instructions, the tools offered and the reasoning effort (where the format's prompt
    sets one), as the conversation's first message (if any)."""
    effort = effort if effort in tool_format.efforts else ""
    if tool_format.native:
        offered = json.dumps([{key: tool.get(key) for key in ("name", "description", "parameters")}
                              for tool in tools]) if tools else ""
        content = instructions or ""
    else:
        offered, content = "", tool_format.system_text(instructions, tools)
    return ChatMessage("developer", content, tools=offered, effort=effort) if content or offered or effort else None


# Kinds whose consecutive items make one message: items of one of them on both sides of a cut
# render otherwise than the two sides rendered apart.
MERGING = frozenset({"calls", "results"})


class Body(NamedTuple):
    """A context's messages (no system message), where they end (the kind of the last item, ""
    for none; None when a reasoning item still waits for the assistant turn it opens, so that
    messages of later items would not simply follow these), and at which item each message's
    items start (a reasoning item it opens included)."""

    messages: list[ChatMessage]
    end: str | None
    starts: list[int]


def body_messages(items: list[dict], tool_format: ToolFormat, reasoning_format: str) -> Body:
    messages: list[ChatMessage] = []
    starts: list[int] = []
    thought = ""  # reasoning waiting for the assistant turn it opens
    thought_from = 0  # ... from this item

    def assistant(message: ChatMessage) -> ChatMessage:
        nonlocal thought
        if thought:
            message, thought = message._replace(content=with_reasoning(reasoning_format, thought, message.content)), ""
        return message

    def add(message: ChatMessage, start: int) -> None:
        starts.append(thought_from if thought else start)
        messages.append(assistant(message) if message.role == "assistant" else message)

    names: dict[str, str] | None = None  # call id: function name, for formats that name results
    kind, at = "", 0
    for kind, grouped in groupby(items, key=lambda item: TURN_OF.get(item["type"], item["type"])):
        group, start = list(grouped), at
        at += len(group)
        if kind == "reasoning":
            if reasoning_format != "none":
                if not thought:
                    thought_from = start
                thought += "\n".join(filter(None, map(reasoning_text, group)))
            continue
        if thought and not (kind == "calls" or (kind == "message" and group[0]["role"] == "assistant")):
            add(ChatMessage("assistant", ""), start)  # the turn was reasoning alone
        if kind == "compaction":
            for index, item in enumerate(group, start):
                add(ChatMessage("user", COMPACTED_PREFIX + item["summary"]), index)
        elif kind == "message":
            for index, item in enumerate(group, start):
                add(ChatMessage(item["role"], _text_of(item["content"])), index)
        elif kind == "calls" and tool_format.native:
            add(ChatMessage("assistant", "", calls=tuple((item["call_id"], *_call(item)) for item in group)), start)
        elif kind == "calls":
            add(ChatMessage("assistant", tool_format.render_calls([_call(item) for item in group])), start)
        elif kind == "results":
            if names is None:
                names = _call_names(items) if tool_format.results_named or tool_format.native else {}
            if tool_format.native:
                for index, item in enumerate(group, start):
                    add(ChatMessage("tool", _text_of(item["output"]), call=(item["call_id"], names.get(item["call_id"]))),
                        index)
            else:
                add(ChatMessage(tool_format.results_role, tool_format.render_results(
                    [(names.get(item.get("call_id")), _text_of(item["output"])) for item in group])), start)
    if thought:
        add(ChatMessage("assistant", ""), at)
        return Body(messages, None, starts)
    return Body(messages, kind, starts)


def extends(end: str | None, items: list[dict]) -> bool:
    """Whether the messages of `items` simply follow those of a context that ended at `end`
    (body_messages): the messages of both together are the two lists end to end."""
    return end is not None and not (items and end in MERGING and TURN_OF.get(items[0]["type"]) == end)
