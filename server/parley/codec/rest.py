"""OpenAI JSON and SSE bytes for the REST face (no generated code needed here)."""

from __future__ import annotations

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


def encode_sse(events: list[dict], encoded: list[bytes] | None = None) -> bytes:
    """SSE frames, one per event (`event:` and `data:` lines), joined; `encoded` reuses the
    events' JSON bytes when the caller has them. Every token passes through here."""
    parts = []
    for event, data in zip(events, encoded or map(orjson.dumps, events), strict=True):
        kind = event["type"]
        head = _FRAME_HEADS.get(kind)
        if head is None:  # a few dozen event types: each head is built once
            head = _FRAME_HEADS[kind] = b"event: " + kind.encode() + b"\ndata: "
        parts += (head, data, b"\n\n")
    return b"".join(parts)
