"""Compaction: the served model summarises a context into one sealed `compaction` item.

Three ways in, one mechanism. A create whose input ends with a `compaction_trigger` item (what
Codex sends) is a compaction run: the model writes a summary of the whole context, and the
response's one output item is a `compaction` item holding it, sealed like encrypted reasoning.
`POST /v1/responses/compact` is such a run that is not stored, answered with the compacted
window: the context's user messages, kept verbatim as OpenAI keeps them, then the compaction
item. `context_management` compacts first, inside a create, when the prompt grows past a
threshold.

A compaction item sent back as input is opened (it must be this server's, intact) and reaches
the prompt as a user message carrying the summary, so the model knows what was compacted.
"""

from __future__ import annotations

from parley.engine.base import ChatMessage
from parley.engine.formats import ToolFormat
from parley.errors import ApiError, ErrorKind
from parley.ids import new_id
from parley.service.conversation import to_messages
from parley.service.sealing import COMPACTION, Sealer

# The summary's budget when the request sets no max_output_tokens.
SUMMARY_TOKENS = 512
SUMMARY_INSTRUCTIONS = (
    "You are compacting a conversation so that it can continue in a shorter context. Write a summary "
    "that keeps every fact, decision, name, number, file, tool result and open task the conversation "
    "will need later. Write only the summary.")
SUMMARY_REQUEST = "Summarise the conversation so far, as instructed."


def sealer_for_compaction(sealer: Sealer | None) -> Sealer:
    if sealer is None:
        raise ApiError(ErrorKind.INVALID_REQUEST, "Compaction needs a sealing key, and none is configured on this "
                       "server.", "input", "unsupported_value")
    return sealer


def opened(items: list[dict], sealer: Sealer | None, first_input: int) -> list[dict]:
    """`items` (the context; the request's input starts at `first_input`) with each compaction
    item's summary readable: copies of those items only, so the stored form keeps nothing but
    the sealed blob."""
    result = []
    for index, item in enumerate(items):
        if item["type"] == "compaction":
            where = f"input[{index - first_input}].encrypted_content" if index >= first_input else "previous_response_id"
            parts = sealer_for_compaction(sealer).open(item["encrypted_content"], where, COMPACTION)
            item = {**item, "summary": "".join(part.get("text", "") for part in parts)}
        result.append(item)
    return result


def summary_messages(items: list[dict], tools: list[dict], tool_format: ToolFormat,
                     reasoning_format: str) -> list[ChatMessage]:
    """The prompt of a compaction run: the context (tools included), then the request to sum it up."""
    return [*to_messages(SUMMARY_INSTRUCTIONS, items, tools, tool_format, reasoning_format),
            ChatMessage("user", SUMMARY_REQUEST)]


def compaction_item(summary: str, sealer: Sealer | None) -> dict:
    return {"type": "compaction", "id": new_id("cmp"),
            "encrypted_content": sealer_for_compaction(sealer).seal([{"type": "summary_text", "text": summary}],
                                                                    COMPACTION)}


def superseded(items: list[dict]) -> list[dict]:
    """A context in which a compaction item stands for what came before it: the items before the
    last one are reduced to its window (a chain that continues from a compaction run's response
    sees the summary, not the turns it summarised)."""
    last = max((index for index, item in enumerate(items) if item["type"] == "compaction"), default=None)
    if last is None:
        return items
    return [*compacted_window(items[:last], items[last])[:-1], *items[last:]]


def compacted_window(context: list[dict], compaction: dict) -> list[dict]:
    """What a client sends next instead of its context: the user messages, then the compaction
    item (earlier compaction items are part of the new summary)."""
    kept = [item for item in context if item["type"] == "message" and item["role"] == "user"]
    return [*kept, compaction]
