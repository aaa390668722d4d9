"""Store test helpers: events as stored runs, and a store's events decoded as the event log does."""

from __future__ import annotations

import orjson
from parley.service.stored_events import decode_rows


def encode_events(events: list[dict]) -> list[tuple[int, int, bytes]]:
    """Each stamped event as a run of its own."""
    return [(event["sequence_number"], event["sequence_number"], orjson.dumps(event)) for event in events]


async def stored_events(store, response_id: str, starting_after: int = -1) -> list[dict]:
    return decode_rows(await store.event_rows(response_id, starting_after), starting_after)
