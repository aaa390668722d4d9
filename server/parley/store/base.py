"""The store port: stored responses, their input items and their stream events, and API keys.

Both implementations (SQLite, PostgreSQL) pass the same test suite. Documents are OpenAI JSON
(dicts). A running response has an owner (the replica generating it) and a lease that the owner
renews; a response whose lease ran out is failed by whichever replica notices first. Every
response belongs to a project: lookups given a project see only that project's responses
(another project's id reads as absent); lookups given none are the server's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import NamedTuple, Protocol

import orjson

from parley.ids import AFFINITY_HEX, chain_tag

ACTIVE = ("queued", "in_progress")
# The project of requests when auth is off, and of the bootstrap key (PARLEY_API_KEY).
DEFAULT_PROJECT = "default"


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """An API key as stored: never the key, only its hash (beside, not in, the record)."""

    id: str
    project: str
    name: str
    created_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None


KEY_COLUMNS = "id, project, name, created_at, last_used_at, revoked_at"  # KeyRecord's fields, in order


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A conversation as stored: its items are an ordered log beside it (conversation_items)."""

    id: str
    project: str | None
    created_at: int
    metadata: dict


# The same in both stores. A response's link to the one it continues is a column, and each output
# item of a finished response a row beside its input items, so that a chain's whole context is
# one recursive query that reads items only (CHAIN_CONTEXT).
CHAIN_COLUMNS = """
    ALTER TABLE responses ADD COLUMN previous_id TEXT;
    ALTER TABLE output_items ADD COLUMN position INTEGER;
    ALTER TABLE output_items ADD COLUMN document BYTEA;
"""
# Rows (depth, part, position, document) of the chain ending at response {0}, in project {1}:
# part 0 an input item, part 1 an output item, part -1 a link (document: the id of the response
# it continues, or null); the caller orders them, oldest response first. `{0}`, `{1}` are the
# dialect's placeholders, `{2}` its way of giving `c.previous` the document column's type, `{3}` how
# the recursive step reaches the previous response (by primary key, one lookup per step).
CHAIN_STEP_JOIN = "JOIN responses r ON r.id = c.previous AND r.project = {1}"
# PostgreSQL's planner, with few statistics, hashes a whole scan of `responses` for every step of
# the join form (1,000 steps: 140 ms). A lateral lookup with LIMIT 1 (which keeps the planner from
# folding it back into a join) stays one index probe per step.
CHAIN_STEP_LATERAL = ("CROSS JOIN LATERAL (SELECT id, previous_id FROM responses "
                      "WHERE id = c.previous AND project = {1} LIMIT 1) r")
CHAIN_CONTEXT = """
    WITH RECURSIVE chain(id, previous, depth) AS (
        SELECT id, previous_id, 0 FROM responses WHERE id = {0} AND project = {1}
        UNION ALL
        SELECT r.id, r.previous_id, c.depth + 1 FROM chain c {3}
    )
    SELECT c.depth, 0, i.position, i.document FROM chain c JOIN input_items i ON i.response_id = c.id
    UNION ALL
    SELECT c.depth, 1, o.position, o.document FROM chain c JOIN output_items o ON o.response_id = c.id
    UNION ALL
    SELECT c.depth, -1, 0, {2} FROM chain c
"""


# A stored item by id, in a response of the project: an output item of a finished response first,
# else an input item. `{0}` is the dialect's placeholder, `{1}` the project condition (or none).
FIND_ITEM = """
    SELECT document FROM (
        SELECT 0 AS kind, o.document FROM output_items o JOIN responses r ON r.id = o.response_id
            WHERE o.item_id = {0}{1}
        UNION ALL
        SELECT 1, i.document FROM input_items i JOIN responses r ON r.id = i.response_id
            WHERE i.item_id = {0}{1}
    ) AS found ORDER BY kind LIMIT 1
"""


def loaded(document) -> dict:
    """A stored JSON document as the drivers return it (bytes, memoryview, or the TEXT that
    SQLite's JSON functions wrote during a migration)."""
    return orjson.loads(document.encode() if isinstance(document, str) else bytes(document))


class ChainBroken(Exception):
    """A response of the chain is gone (deleted, expired, or another project's)."""

    def __init__(self, missing: str):
        super().__init__(missing)
        self.missing = missing


class Chain(NamedTuple):
    """A previous_response_id chain's context: its items, oldest first, and the chain tags of
    its responses (the tags their deletions leave in chain_tombstones)."""

    items: list[dict]
    tags: frozenset[str]


def chain_items(response_id: str, rows) -> Chain | None:
    """The context from CHAIN_CONTEXT's rows: None when the chain's last response is absent;
    ChainBroken when one it continues is."""
    rows = sorted(rows, key=lambda row: (-row[0], row[1], row[2]))
    if not rows:
        return None
    links = [_text(document) for _, part, _, document in rows if part == -1 and document is not None]
    deepest = rows[0]
    if deepest[1] == -1 and deepest[3] is not None:
        raise ChainBroken(links[0])
    return Chain([loaded(document) for _, part, _, document in rows if part != -1],
                 frozenset(map(chain_tag, [response_id, *links])))


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, memoryview)) else str(value)


# A deleted response leaves its chain tag here, in the same transaction, so that a replica that
# keeps a chain's context in memory (service/turn_state.py) learns, with one lookup, that the
# chain may have lost a response. Kept TOMBSTONE_SECONDS, far longer than such a context is kept.
TOMBSTONE_SECONDS = 24 * 3600
TOMBSTONE_TABLE = "CREATE TABLE chain_tombstones (tag TEXT PRIMARY KEY, deleted_at DOUBLE PRECISION NOT NULL)"
# The chain tag of the response id in column {0}: as chain_tag() (the dialects share substr).
TAG_OF = "substr({0}, %d, %d)" % (len("resp_") + 1, AFFINITY_HEX)


# The same in both stores (SQL that both dialects read alike). A conversation's items are an
# ordered log: each has a position, and `next_position` is where the next one goes, so that a
# turn loads the whole conversation in one range read.
CONVERSATION_TABLES = """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        metadata BYTEA NOT NULL,
        next_position INTEGER NOT NULL
    );
    CREATE TABLE conversation_items (
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        item_id TEXT NOT NULL,
        document BYTEA NOT NULL,
        PRIMARY KEY (conversation_id, position)
    );
    CREATE INDEX conversation_items_item ON conversation_items (conversation_id, item_id);
"""
# A conversation's revision counts the changes of its items (added, joined by a response,
# deleted): a replica that keeps a conversation's context (service/turn_state.py) trusts it while
# the revision is the one it expects.
CONVERSATION_REVISION = "ALTER TABLE conversations ADD COLUMN revision INTEGER NOT NULL DEFAULT 0"
# The statuses whose items join their conversation: OpenAI adds a response's items "after this
# response completes" (cut off by max_output_tokens counts; failed and cancelled do not).
JOINING_STATUSES = ("completed", "incomplete")


def joins_conversation(response: dict) -> str | None:
    """The conversation a finished response's items go to, if any."""
    conversation = response.get("conversation")
    if conversation and response["status"] in JOINING_STATUSES:
        return conversation["id"]
    return None


def conversation_item_rows(conversation_id: str, start: int, items: list[dict]) -> list[tuple]:
    return [(conversation_id, start + offset, item["id"], orjson.dumps(item)) for offset, item in enumerate(items)]


@dataclasses.dataclass(frozen=True)
class ItemPage:
    items: list[dict]
    has_more: bool


# Given the stored document and the next sequence number, return (new document, the final
# event's stored line).
Recovery = Callable[[dict, int], tuple[dict, bytes]]

# Consecutive events as stored: (first sequence number, last, their stored lines joined by "\n").
# The store never looks inside: encoding, compaction and decoding belong to the event log
# (service/event_log.py). One stored row holds one or more runs.
EventRun = tuple[int, int, bytes]


def pack(runs: list[EventRun]) -> tuple[int, int, bytes]:
    """One stored row for consecutive runs: (first sequence number, last, the lines joined)."""
    return runs[0][0], runs[-1][1], b"\n".join(run[2] for run in runs)


class ResponseStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, response: dict, input_items: list[dict], owner: str | None = None,
                     lease_until: float | None = None, project: str = DEFAULT_PROJECT) -> None:
        """Persist a new response of `project` with its input items, atomically."""

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

    async def cancel(self, response_id: str, project: str | None = None) -> tuple[dict | None, bool]:
        """Mark an active response cancelled. Returns (document, changed)."""

    async def get(self, response_id: str, project: str | None = None) -> dict | None: ...

    async def input_items(self, response_id: str, project: str | None = None) -> list[dict] | None:
        """All input items in order, or None when the response does not exist."""

    async def list_input_items(self, response_id: str, *, limit: int, order: str, after: str | None,
                               before: str | None, project: str | None = None) -> ItemPage | None: ...

    async def chain_context(self, response_id: str, project: str) -> Chain | None:
        """Input and output items of the whole previous_response_id chain ending at
        `response_id`, oldest first, in one query; None when it does not exist, ChainBroken when
        a response it continues does not (any more)."""

    async def chain_intact(self, response_id: str, project: str, tags: Collection[str]) -> bool:
        """Whether the response exists in the project and no response of a chain tagged with
        one of `tags` was deleted within TOMBSTONE_SECONDS: one lookup that lets a replica trust
        the chain's context it kept."""

    async def find_item(self, item_id: str, project: str | None = None) -> dict | None:
        """A stored item by its id (an output item of a finished response, else an input item),
        or None; given a project, only that project's."""

    async def event_rows(self, response_id: str, starting_after: int = -1) -> list[bytes]:
        """The stored rows (as bytes, in order) that hold events after `starting_after`."""

    async def delete(self, response_id: str, project: str | None = None) -> bool:
        """Remove the response, its items and its events; False when it did not exist."""

    async def create_conversation(self, conversation: Conversation, items: list[dict]) -> None:
        """A new conversation with its first items, atomically."""

    async def get_conversation(self, conversation_id: str, project: str | None = None) -> Conversation | None: ...

    async def update_conversation(self, conversation_id: str, metadata: dict, project: str | None = None) -> bool:
        """Replace its metadata; False when there is no such conversation."""

    async def delete_conversation(self, conversation_id: str, project: str | None = None) -> bool:
        """Remove it and its items (responses that belonged to it stay)."""

    async def add_conversation_items(self, conversation_id: str, items: list[dict],
                                     project: str | None = None) -> bool:
        """Append `items` in order; False when there is no such conversation."""

    async def conversation_context(self, conversation_id: str,
                                   project: str | None = None) -> tuple[list[dict], int] | None:
        """The conversation's items in order and its revision (see CONVERSATION_REVISION), as
        of one moment; None when it does not exist (in the project)."""

    async def conversation_revision(self, conversation_id: str, project: str | None = None) -> int | None:
        """The conversation's revision, or None when it does not exist (in the project)."""

    async def conversation_items(self, conversation_id: str, project: str | None = None) -> list[dict] | None:
        """Every item in order (one range read), or None when there is no such conversation."""

    async def delete_conversation_item(self, conversation_id: str, item_id: str,
                                       project: str | None = None) -> bool | None:
        """Remove one item; None when there is no such conversation, False when no such item."""

    async def create_key(self, record: KeyRecord, digest: bytes) -> None:
        """Store a new key's record and the SHA-256 of the key."""

    async def list_keys(self) -> list[KeyRecord]: ...

    async def key_by_hash(self, digest: bytes) -> KeyRecord | None: ...

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke a key now; False when no active key has that id."""

    async def touch_key(self, key_id: str, when: float) -> None:
        """Record that the key was used at `when`."""

    async def has_keys(self) -> bool:
        """Whether any key was ever created, revoked ones included: revoking the last key must
        not turn auth off."""

    async def renew_leases(self, owner: str, lease_until: float, response_ids: Collection[str]) -> int:
        """Extend the lease of those of `response_ids` that are active and this owner's. A response
        its owner no longer runs (its final write failed) then expires, and recovery fails it."""

    async def recover_expired(self, now: float, recovery: Recovery) -> list[str]:
        """Finish every active response whose lease ended before `now`; return their ids."""

    async def delete_finished_before(self, cutoff: float) -> int:
        """Retention: delete finished responses created before `cutoff` (unix seconds)."""


def output_item_rows(document: dict) -> list[tuple[str, str, int, bytes]]:
    """(item id, response id, position, item) of each output item of `document`: where an
    item_reference finds it, and what a chain's context reads."""
    return [(item["id"], document["id"], position, orjson.dumps(item))
            for position, item in enumerate(document["output"]) if stored_output(item)]


def stored_output(item) -> bool:
    """Whether an output item is stored as a row of its own (what a chain's context reads)."""
    return isinstance(item, dict) and "id" in item


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

    async def list_input_items(self, response_id: str, *, limit: int, order: str, after: str | None,
                               before: str | None, project: str | None = None) -> ItemPage | None:
        items = await self.input_items(response_id, project)
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
