"""OpenAI JSON and SSE bytes for the REST face (no generated code needed here)."""

from __future__ import annotations

import orjson

from parley.errors import invalid

JSON = "application/json"
SSE = "text/event-stream"


def decode_body(data: bytes):
    if not data.strip():
        raise invalid("The request body is empty; expected a JSON object.", None, "invalid_json")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"We could not parse the JSON body of your request. ({exc.msg} at position {exc.pos})",
                      None, "invalid_json") from None


def encode_json(document) -> bytes:
    return orjson.dumps(document)


def encode_sse(event: dict, encoded: bytes | None = None) -> bytes:
    """One SSE frame; `encoded` reuses the event's JSON bytes when the caller has them."""
    return b"event: " + event["type"].encode() + b"\ndata: " + (encoded or orjson.dumps(event)) + b"\n\n"
