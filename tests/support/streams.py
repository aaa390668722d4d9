"""The shared stream checker: exact event sequences and the invariants every stream keeps."""

from __future__ import annotations


def event_types(events: list[dict]) -> list[str]:
    return [event["type"] for event in events]


def text_message_sequence(deltas: int, closing: str = "response.completed") -> list[str]:
    """The exact event types of a response with one text message of `deltas` deltas."""
    return [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        closing,
    ]


def check_stream(events: list[dict]) -> dict:
    """Assert the invariants of a finished stream; return the final response document."""
    assert events, "empty stream"
    numbers = [event["sequence_number"] for event in events]
    assert numbers == list(range(len(events))), f"sequence numbers not 0..n-1: {numbers}"
    assert events[0]["type"] == "response.created"
    final = events[-1]
    assert final["type"] in ("response.completed", "response.incomplete", "response.failed"), final["type"]
    response = final["response"]
    assert events[0]["response"]["id"] == response["id"]
    texts: dict[tuple[str, int], list[str]] = {}
    for event in events:
        if event["type"] == "response.output_text.delta":
            texts.setdefault((event["item_id"], event["content_index"]), []).append(event["delta"])
        if event["type"] == "response.output_text.done":
            key = (event["item_id"], event["content_index"])
            assert "".join(texts.get(key, [])) == event["text"], "deltas do not concatenate to the done text"
        if event["type"] == "response.output_item.done":
            assert response["output"][event["output_index"]] == event["item"], "item differs from final object"
    streamed_ids = {event["item"]["id"] for event in events if event["type"] == "response.output_item.added"}
    assert streamed_ids == {item["id"] for item in response["output"]}
    return response
