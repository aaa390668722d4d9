"""OpenAI JSON and SSE bytes for the REST face (no generated code needed here)."""

from __future__ import annotations

import random
import secrets
import string

import orjson

from parley.errors import invalid

JSON = "application/json"
SSE = "text/event-stream"


def decode_body(data: bytes, content_type: str = JSON):
    """The JSON body of a POST. Only `application/json` is read as JSON: a page in a browser can
    send `text/plain` across origins without asking, and must not reach a server on localhost."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != JSON and not (media_type.startswith("application/") and media_type.endswith("+json")):
        raise invalid(f"Unsupported content type {content_type[:100]!r}: send the body as application/json.",
                      None, "unsupported_content_type")
    if not data.strip():
        raise invalid("The request body is empty; expected a JSON object.", None, "invalid_json")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"We could not parse the JSON body of your request. ({exc.msg} at position {exc.pos})",
                      None, "invalid_json") from None


# The last frame of every event stream.
SSE_DONE = b"data: [DONE]\n\n"


def encode_json(document) -> bytes:
    return orjson.dumps(document)


_FRAME_HEADS: dict[str, bytes] = {}

# The delta events that carry OpenAI's `obfuscation` padding (stream_options.include_obfuscation,
# on by default): random characters that round each event's size up to a multiple of
# OBFUSCATION_BLOCK bytes, so that an observer of encrypted traffic cannot read token lengths
# off the frame sizes.
OBFUSCATED_EVENTS = frozenset({
    "response.output_text.delta", "response.reasoning_text.delta", "response.reasoning_summary_text.delta",
    "response.function_call_arguments.delta", "response.custom_tool_call_input.delta", "response.refusal.delta",
})
OBFUSCATION_BLOCK = 16
_OBFUSCATION_HEAD = b',"obfuscation":"'
_OBFUSCATION_OVERHEAD = len(_OBFUSCATION_HEAD) + 1  # the closing quote
# Slices of one random string: the padding needs no fresh entropy per token, and this keeps it
# off the hot path's cost.
_PADDING = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(4096)).encode()


def obfuscated(data: bytes) -> bytes:
    """An event's JSON bytes (an object) with an `obfuscation` field padding it to a block."""
    length = -(len(data) + _OBFUSCATION_OVERHEAD) % OBFUSCATION_BLOCK or OBFUSCATION_BLOCK
    start = random.randrange(len(_PADDING) - OBFUSCATION_BLOCK)
    return b"".join((data[:-1], _OBFUSCATION_HEAD, _PADDING[start:start + length], b'"}'))


def encode_sse(events: list[dict], encoded: list[bytes] | None = None, obfuscate: bool = False) -> bytes:
    """SSE frames, one per event (`event:` and `data:` lines), joined; `encoded` reuses the
    events' JSON bytes when the caller has them. Every token passes through here."""
    parts = []
    for event, data in zip(events, encoded or map(orjson.dumps, events), strict=True):
        kind = event["type"]
        head = _FRAME_HEADS.get(kind)
        if head is None:  # a few dozen event types: each head is built once
            head = _FRAME_HEADS[kind] = b"event: " + kind.encode() + b"\ndata: "
        if obfuscate and kind in OBFUSCATED_EVENTS:
            data = obfuscated(data)
        parts += (head, data, b"\n\n")
    return b"".join(parts)


def encode_ws(events: list[dict], encoded: list[bytes] | None = None, stream_id: str | None = None,
              obfuscate: bool = True) -> list[bytes]:
    """WebSocket messages, one per event: the event's JSON (the same bytes an SSE frame carries,
    padded alike), with the lane's `stream_id` added when it has one."""
    tag = None if stream_id is None else b',"stream_id":' + orjson.dumps(stream_id) + b"}"
    messages = []
    for event, data in zip(events, encoded or map(orjson.dumps, events), strict=True):
        if obfuscate and event["type"] in OBFUSCATED_EVENTS:
            data = obfuscated(data)
        if tag is not None and "stream_id" not in event:
            data = data[:-1] + tag
        messages.append(data)
    return messages
