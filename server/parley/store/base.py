"""The store port: stored responses, their input items and their stream events.

Both implementations (SQLite, PostgreSQL) pass the same test suite. Documents are OpenAI JSON
(dicts). A running response has an owner (the replica generating it) and a lease that the owner
renews; a response whose lease ran out is failed by whichever replica notices first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import orjson

ACTIVE = ("queued", "in_progress")


@dataclasses.dataclass(frozen=True)
class ItemPage:
    items: list[dict]
    has_more: bool


# Given the stored document and the next sequence number, return (new document, final event).
Recovery = Callable[[dict, int], tuple[dict, dict]]

# Consecutive events as stored: (first sequence number, last, their JSON bytes as lines). The
# bytes are the ones sent on the stream, encoded once; one stored row holds one or more runs.
EventRun = tuple[int, int, bytes]


def encode_events(events: list[dict]) -> list[EventRun]:
    """Events that were not streamed (a lease recovery's final event, tests) as runs."""
    return [(event["sequence_number"], event["sequence_number"], orjson.dumps(event)) for event in events]


def pack(runs: list[EventRun]) -> tuple[int, int, bytes]:
    """One stored row for consecutive runs: (first sequence number, last, the events as JSON lines)."""
    return runs[0][0], runs[-1][1], b"\n".join(run[2] for run in runs)


TEXT_DELTA = "response.output_text.delta"


def text_run_line(first: dict, texts: list[str]) -> bytes:
    """The stored line of consecutive plain text deltas (no logprobs) of one content part:
    `first` is the first of their events, `texts` their deltas. `unpack` expands it back to the
    very same events. Deltas are most of what a response stores, and as full events each repeats
    its type and item id around a few bytes of text."""
    return orjson.dumps({"text_deltas": texts, "item_id": first["item_id"], "output_index": first["output_index"],
                         "content_index": first["content_index"], "sequence_number": first["sequence_number"]})


def unpack(rows, starting_after: int) -> list[dict]:
    events = []
    for (blob,) in rows:
        data = blob.encode() if isinstance(blob, str) else bytes(blob)  # rows migrated from v2 are TEXT
        for line in data.split(b"\n"):
            event = orjson.loads(line)
            deltas = event.get("text_deltas")
            if deltas is None:
                if event["sequence_number"] > starting_after:
                    events.append(event)
                continue
            first = event["sequence_number"]
            for number in range(max(first, starting_after + 1), first + len(deltas)):
                # The key order of ResponseBuilder's delta events: replayed bytes equal streamed ones.
                events.append({"type": TEXT_DELTA, "item_id": event["item_id"], "output_index": event["output_index"],
                               "content_index": event["content_index"], "delta": deltas[number - first],
                               "logprobs": [], "sequence_number": number})
    return events


class ResponseStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, response: dict, input_items: list[dict], owner: str | None = None,
                     lease_until: float | None = None) -> None:
        """Persist a new response with its input items, atomically."""

    async def update(self, response: dict, expected: tuple[str, ...] = ACTIVE) -> bool:
        """Replace the document if the stored status is in `expected`; False otherwise."""

    async def append_events(self, response_id: str, events: list[EventRun]) -> None:
        """Store a batch of consecutive events (one row, however many events)."""

    async def append_event_batches(self, batches: list[tuple[str, list[EventRun]]], creates: list[tuple] = (),
                                   finishes: list[tuple[dict, tuple[str, ...]]] = ()) -> None:
        """One transaction (the event sink's write): `creates` (the arguments of `create`), then
        each response's runs as one row, then `finishes` (document, expected statuses): each
        document replaces the stored one if its status is in `expected`, else is dropped."""

    async def finish(self, response: dict, events: list[EventRun], expected: tuple[str, ...] = ACTIVE) -> bool:
        """Append events and replace the document if the stored status is in `expected`."""

    async def cancel(self, response_id: str) -> tuple[dict | None, bool]:
        """Mark an active response cancelled. Returns (document, changed)."""

    async def get(self, response_id: str) -> dict | None: ...

    async def input_items(self, response_id: str) -> list[dict] | None:
        """All input items in order, or None when the response does not exist."""

    async def list_input_items(self, response_id: str, *, limit: int, order: str,
                               after: str | None, before: str | None) -> ItemPage | None: ...

    async def events(self, response_id: str, starting_after: int = -1) -> list[dict]: ...

    async def delete(self, response_id: str) -> bool:
        """Remove the response, its items and its events; False when it did not exist."""

    async def renew_leases(self, owner: str, lease_until: float) -> int:
        """Extend the lease of every active response this owner runs."""

    async def recover_expired(self, now: float, recovery: Recovery) -> list[str]:
        """Finish every active response whose lease ended before `now`; return their ids."""

    async def delete_finished_before(self, cutoff: float) -> int:
        """Retention: delete finished responses created before `cutoff` (unix seconds)."""


def cancel_transition(stored: bytes | None) -> tuple[dict | None, bool]:
    """The cancel rule on a stored document: (document, changed). A changed one must be written."""
    if stored is None:
        return None, False
    document = orjson.loads(stored)
    if document["status"] not in ACTIVE:
        return document, False
    document["status"] = "cancelled"
    return document, True


class InputItemPaging:
    """`list_input_items` for any store that can return all of a response's input items."""

    async def list_input_items(self, response_id: str, *, limit: int, order: str,
                               after: str | None, before: str | None) -> ItemPage | None:
        items = await self.input_items(response_id)
        if items is None:
            return None
        return paginate(items, limit=limit, order=order, after=after, before=before)


def paginate(items: list[dict], *, limit: int, order: str, after: str | None, before: str | None) -> ItemPage:
    """Cursor pagination over items in `order`; `after`/`before` are item ids (exclusive)."""
    ordered = items if order == "asc" else list(reversed(items))
    ids = [item["id"] for item in ordered]
    start, end = 0, len(ordered)
    if after is not None:
        start = ids.index(after) + 1 if after in ids else len(ids)
    if before is not None:
        end = ids.index(before) if before in ids else 0
    window = ordered[start:end]
    return ItemPage(window[:limit], len(window) > limit)
