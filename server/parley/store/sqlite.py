"""SQLite store: one file, WAL journal, durable across restarts; the single-node default.

sqlite3 calls run on one dedicated thread with one connection, so writes are serialized and
the event loop never blocks on disk. Several processes must not share one file: use
PostgreSQL for several replicas.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from parley.log import get_logger
from parley.store.base import (
    ACTIVE,
    CHAIN_COLUMNS,
    CHAIN_CONTEXT,
    CHAIN_STEP_JOIN,
    CONVERSATION_REVISION,
    CONVERSATION_TABLES,
    DEFAULT_PROJECT,
    FIND_ITEM,
    KEY_COLUMNS,
    TAG_OF,
    TOMBSTONE_SECONDS,
    TOMBSTONE_TABLE,
    Chain,
    Conversation,
    EventRun,
    InputItemPaging,
    KeyRecord,
    Recovery,
    cancel_transition,
    chain_items,
    conversation_item_rows,
    joins_conversation,
    loaded,
    output_item_rows,
    pack,
)

log = get_logger(__name__)

MIGRATIONS = {
    1: """
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            created_at INTEGER NOT NULL,
            status TEXT NOT NULL,
            document BLOB NOT NULL
        );
        CREATE TABLE input_items (
            response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            item_id TEXT NOT NULL,
            document BLOB NOT NULL,
            PRIMARY KEY (response_id, position)
        );
        CREATE TABLE events (
            response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
            sequence_number INTEGER NOT NULL,
            document BLOB NOT NULL,
            PRIMARY KEY (response_id, sequence_number)
        );
    """,
    2: """
        ALTER TABLE responses ADD COLUMN owner TEXT;
        ALTER TABLE responses ADD COLUMN lease_until REAL;
        CREATE INDEX responses_active ON responses (status, lease_until);
        CREATE INDEX responses_created ON responses (created_at);
    """,
    3: """
        CREATE TABLE event_batches (
            response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            events BLOB NOT NULL,
            PRIMARY KEY (response_id, first_seq)
        );
        INSERT INTO event_batches (response_id, first_seq, last_seq, events)
            SELECT response_id, sequence_number, sequence_number, document FROM events;
        DROP TABLE events;
    """,
    4: """
        ALTER TABLE responses ADD COLUMN project TEXT NOT NULL DEFAULT 'default';
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            project TEXT NOT NULL,
            name TEXT NOT NULL,
            hash BLOB NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            last_used_at REAL,
            revoked_at REAL
        );
    """,
    5: """
        CREATE INDEX input_items_item ON input_items (item_id);
        CREATE TABLE output_items (
            item_id TEXT PRIMARY KEY,
            response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE
        );
        CREATE INDEX output_items_response ON output_items (response_id);
        INSERT OR IGNORE INTO output_items (item_id, response_id)
            SELECT json_extract(o.value, '$.id'), r.id FROM responses r, json_each(CAST(r.document AS TEXT), '$.output') o
            WHERE json_extract(o.value, '$.id') IS NOT NULL;
    """,
    6: CONVERSATION_TABLES,
    7: CHAIN_COLUMNS + """;
        UPDATE responses SET previous_id = json_extract(CAST(document AS TEXT), '$.previous_response_id');
        UPDATE output_items SET
            position = (SELECT CAST(o.key AS INTEGER) FROM responses r, json_each(CAST(r.document AS TEXT), '$.output') o
                        WHERE r.id = output_items.response_id AND json_extract(o.value, '$.id') = output_items.item_id),
            document = (SELECT o.value FROM responses r, json_each(CAST(r.document AS TEXT), '$.output') o
                        WHERE r.id = output_items.response_id AND json_extract(o.value, '$.id') = output_items.item_id);
    """,
    8: TOMBSTONE_TABLE + ";" + CONVERSATION_REVISION,
}
SCHEMA_VERSION = max(MIGRATIONS)


_INSERT_RESPONSES = ("INSERT INTO responses (id, created_at, status, document, owner, lease_until, project, "
                     "previous_id)")
_INSERT_ITEMS = "INSERT INTO input_items (response_id, position, item_id, document)"
_INSERT_CONVERSATION_ITEMS = "INSERT INTO conversation_items (conversation_id, position, item_id, document)"
_UPSERT_RUNS = "INSERT OR REPLACE INTO event_batches (response_id, first_seq, last_seq, events)"
# UPDATE ... FROM, which writes many final documents in one statement, came in SQLite 3.33.
MIN_SQLITE = (3, 33, 0)
# Bound values per statement; SQLite's own limit is higher (32766 since 3.32).
_MAX_VARIABLES = 30000


def _in(statuses: tuple[str, ...]) -> str:
    return "(" + ",".join("?" * len(statuses)) + ")"


def _response_row(response: dict, owner, lease_until, project) -> tuple:
    return (response["id"], response["created_at"], response["status"], orjson.dumps(response), owner, lease_until,
            project, response.get("previous_response_id"))


def _input_item_rows(response_id: str, items: list[dict]) -> list[tuple]:
    return [(response_id, position, item["id"], orjson.dumps(item)) for position, item in enumerate(items)]


def _statements(rows: list[tuple]):
    """(placeholders, values) per statement, each within the bound-values limit."""
    width = len(rows[0])
    per_statement = _MAX_VARIABLES // width
    for start in range(0, len(rows), per_statement):
        chunk = rows[start:start + per_statement]
        yield ",".join(["(" + ",".join("?" * width) + ")"] * len(chunk)), [value for row in chunk for value in row]


def _insert_rows(db, insert: str, rows: list[tuple]) -> None:
    """`insert` ("INSERT INTO table (columns)") with `rows`, in as few statements as the limit allows."""
    if rows:
        for placeholders, values in _statements(rows):
            db.execute(f"{insert} VALUES {placeholders}", values)


def _insert_responses(db, creates: list[tuple]) -> None:
    """New responses with their input items; each create is (response, input_items, owner, lease_until,
    project)."""
    _insert_rows(db, _INSERT_RESPONSES, [_response_row(response, *row) for response, _, *row in creates])
    _insert_rows(db, _INSERT_ITEMS,
                 [row for response, items, *_ in creates for row in _input_item_rows(response["id"], items)])


def _delete_responses(db, where: str, values: tuple) -> int:
    """Delete the responses `where` selects, leaving their chains' tombstones."""
    db.execute(f"INSERT OR REPLACE INTO chain_tombstones (tag, deleted_at) SELECT DISTINCT {TAG_OF.format('id')}, ? "
               f"FROM responses WHERE {where}", (time.time(), *values))
    return db.execute("DELETE FROM responses WHERE " + where, values).rowcount


def _scoped(project: str | None) -> tuple[str, tuple]:
    """The SQL condition (and its value) that keeps a lookup inside `project` (None: any)."""
    return ("", ()) if project is None else (" AND project = ?", (project,))


def _append_runs(db, batches: list[tuple[str, list[EventRun]]]) -> None:
    """Each response's runs as one stored row."""
    _insert_rows(db, _UPSERT_RUNS, [(response_id, *pack(runs)) for response_id, runs in batches if runs])


def _conversation_row(db, conversation_id: str, project: str | None):
    where, values = _scoped(project)
    return db.execute("SELECT id, created_at, metadata, next_position FROM conversations WHERE id = ?" + where,
                      (conversation_id, *values)).fetchone()


def _append_conversation(db, conversation_id: str, items: list[dict]) -> None:
    """`items` after the conversation's last item, in order."""
    (start,) = db.execute("SELECT next_position FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
    _insert_rows(db, _INSERT_CONVERSATION_ITEMS, conversation_item_rows(conversation_id, start, items))
    db.execute("UPDATE conversations SET next_position = ?, revision = revision + ? WHERE id = ?",
               (start + len(items), 1 if items else 0, conversation_id))


def _join_conversations(db, finishes: list[tuple[dict, tuple[str, ...]]]) -> None:
    """A finish that completes a response of a conversation appends its input and output items
    to it, in the same transaction, only if the stored status lets the finish happen."""
    for response, expected in finishes:
        conversation_id = joins_conversation(response)
        if conversation_id is None:
            continue
        row = db.execute("SELECT status FROM responses WHERE id = ?", (response["id"],)).fetchone()
        if row is None or row[0] not in expected or not db.execute(
                "SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone():
            continue
        inputs = [orjson.loads(blob) for (blob,) in db.execute(
            "SELECT document FROM input_items WHERE response_id = ? ORDER BY position", (response["id"],))]
        _append_conversation(db, conversation_id, inputs + response["output"])


def _index_outputs(db, documents) -> None:
    """Where each output item of `documents` lives, so that an item_reference finds it. A
    response deleted meanwhile is skipped (a foreign-key error would fail the whole write)."""
    rows = [row for document in documents for row in output_item_rows(document)]
    if rows:
        for placeholders, values in _statements(rows):
            db.execute("INSERT OR REPLACE INTO output_items (item_id, response_id, position, document) "
                       f"SELECT v.column1, v.column2, v.column3, v.column4 FROM (VALUES {placeholders}) AS v "
                       "JOIN responses r ON r.id = v.column2", values)


def _replace_many(db, finishes: list[tuple[dict, tuple[str, ...]]]) -> None:
    """Each (document, expected) replaces the stored document if the stored status is in `expected`."""
    _index_outputs(db, [response for response, _ in finishes])
    _join_conversations(db, finishes)
    if finishes:
        rows = [(response["id"], response["status"], orjson.dumps(response), "," + ",".join(expected) + ",")
                for response, expected in finishes]
        for placeholders, values in _statements(rows):
            db.execute("UPDATE responses SET status = v.column2, document = v.column3 "
                       f"FROM (VALUES {placeholders}) AS v "
                       "WHERE responses.id = v.column1 AND instr(v.column4, ',' || responses.status || ',') > 0",
                       values)


class SqliteStore(InputItemPaging):
    def __init__(self, path: str | Path, synchronous: str = "FULL"):
        """`synchronous`: FULL (the default) makes every commit survive a power loss, not only a
        crash of the process; NORMAL, in WAL mode, survives the process's crash only."""
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _transact(self, work):
        return await self._call(self._transaction, work)

    def _transaction(self, work):
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
            return result
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def open(self) -> None:
        await self._call(self._open)
        log.info("store.open", backend="sqlite", path=str(self.path), synchronous=self.synchronous)

    def _open(self) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise RuntimeError(f"Parley's SQLite store needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer; this "
                               f"Python links {sqlite3.sqlite_version}. Use a newer Python build, or PostgreSQL "
                               "(PARLEY_STORE_DSN).")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
        self._db = db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for target in range(version + 1, SCHEMA_VERSION + 1):
            def migrate(db, target=target):
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={target}")
            self._transaction(migrate)
            log.info("store.migrated", backend="sqlite", version=target)

    async def close(self) -> None:
        def _close():
            if self._db is not None:
                self._db.close()
                self._db = None
        await self._call(_close)
        self._executor.shutdown(wait=True)

    async def create(self, response: dict, input_items: list[dict], owner: str | None = None,
                     lease_until: float | None = None, project: str = DEFAULT_PROJECT) -> None:
        await self._transact(lambda db: _insert_responses(db, [(response, input_items, owner, lease_until, project)]))

    @staticmethod
    def _replace(db, response: dict, expected: tuple[str, ...]) -> bool:
        _join_conversations(db, [(response, expected)])
        cursor = db.execute(f"UPDATE responses SET status = ?, document = ? WHERE id = ? AND status IN {_in(expected)}",
                            (response["status"], orjson.dumps(response), response["id"], *expected))
        if cursor.rowcount > 0:
            _index_outputs(db, [response])
        return cursor.rowcount > 0

    async def update(self, response: dict, expected: tuple[str, ...] = ACTIVE) -> bool:
        return await self._transact(lambda db: self._replace(db, response, expected))

    async def append_events(self, response_id: str, events: list[EventRun]) -> None:
        await self.append_event_batches([(response_id, events)])

    async def append_event_batches(self, batches: list[tuple[str, list[EventRun]]], creates: list[tuple] = (),
                                   finishes: list[tuple[dict, tuple[str, ...]]] = ()) -> None:
        # A few multi-row statements, however many responses: every statement hands the GIL to
        # the event loop and back, which costs more than SQLite's own work per row.
        def _append_all(db):
            _insert_responses(db, creates)
            _append_runs(db, batches)
            _replace_many(db, finishes)
        if batches or creates or finishes:
            await self._transact(_append_all)

    async def finish(self, response: dict, events: list[EventRun], expected: tuple[str, ...] = ACTIVE) -> bool:
        def _finish(db):
            if not self._replace(db, response, expected):
                return False
            _append_runs(db, [(response["id"], events)])
            return True
        return await self._transact(_finish)

    async def cancel(self, response_id: str, project: str | None = None) -> tuple[dict | None, bool]:
        where, values = _scoped(project)

        def _cancel(db):
            row = db.execute("SELECT document FROM responses WHERE id = ?" + where, (response_id, *values)).fetchone()
            document, changed = cancel_transition(row[0] if row else None)
            if changed:
                self._replace(db, document, ACTIVE)
            return document, changed
        return await self._transact(_cancel)

    async def get(self, response_id: str, project: str | None = None) -> dict | None:
        where, values = _scoped(project)

        def _get():
            row = self._db.execute("SELECT document FROM responses WHERE id = ?" + where,
                                   (response_id, *values)).fetchone()
            return orjson.loads(row[0]) if row else None
        return await self._call(_get)

    async def input_items(self, response_id: str, project: str | None = None) -> list[dict] | None:
        where, values = _scoped(project)

        def _items():
            if not self._db.execute("SELECT 1 FROM responses WHERE id = ?" + where, (response_id, *values)).fetchone():
                return None
            rows = self._db.execute("SELECT document FROM input_items WHERE response_id = ? ORDER BY position",
                                    (response_id,)).fetchall()
            return [orjson.loads(r[0]) for r in rows]
        return await self._call(_items)

    async def chain_context(self, response_id: str, project: str) -> Chain | None:
        query = CHAIN_CONTEXT.format("?1", "?2", "c.previous", CHAIN_STEP_JOIN.format("?1", "?2"))
        return await self._call(
            lambda: chain_items(response_id, self._db.execute(query, (response_id, project)).fetchall()))

    async def chain_intact(self, response_id: str, project: str, tags) -> bool:
        tags = list(tags) or [""]  # no tag is ""
        query = (f"SELECT EXISTS (SELECT 1 FROM responses WHERE id = ? AND project = ?) AND NOT EXISTS "
                 f"(SELECT 1 FROM chain_tombstones WHERE tag IN ({', '.join('?' * len(tags))}))")
        return await self._call(lambda: bool(self._db.execute(query, (response_id, project, *tags)).fetchone()[0]))

    async def find_item(self, item_id: str, project: str | None = None) -> dict | None:
        where, values = _scoped(project)

        def _find():
            row = self._db.execute(FIND_ITEM.format("?", where), (item_id, *values, item_id, *values)).fetchone()
            return loaded(row[0]) if row else None
        return await self._call(_find)

    async def event_rows(self, response_id: str, starting_after: int = -1) -> list[bytes]:
        def _rows():
            rows = self._db.execute(
                "SELECT events FROM event_batches WHERE response_id = ? AND last_seq > ? ORDER BY first_seq",
                (response_id, starting_after)).fetchall()
            # Rows migrated from schema 2 are TEXT.
            return [blob.encode() if isinstance(blob, str) else bytes(blob) for (blob,) in rows]
        return await self._call(_rows)

    async def delete(self, response_id: str, project: str | None = None) -> bool:
        where, values = _scoped(project)
        return await self._transact(lambda db: _delete_responses(db, "id = ?" + where, (response_id, *values)) > 0)

    # -- conversations -----------------------------------------------------------------------

    async def create_conversation(self, conversation: Conversation, items: list[dict]) -> None:
        def _create(db):
            db.execute("INSERT INTO conversations (id, project, created_at, metadata, next_position) "
                       "VALUES (?, ?, ?, ?, 0)", (conversation.id, conversation.project, conversation.created_at,
                                                  orjson.dumps(conversation.metadata)))
            _append_conversation(db, conversation.id, items)
        await self._transact(_create)

    async def get_conversation(self, conversation_id: str, project: str | None = None) -> Conversation | None:
        def _get():
            row = _conversation_row(self._db, conversation_id, project)
            return None if row is None else Conversation(row[0], project, row[1], orjson.loads(row[2]))
        return await self._call(_get)

    async def update_conversation(self, conversation_id: str, metadata: dict, project: str | None = None) -> bool:
        where, values = _scoped(project)
        return await self._transact(lambda db: db.execute(
            "UPDATE conversations SET metadata = ? WHERE id = ?" + where,
            (orjson.dumps(metadata), conversation_id, *values)).rowcount > 0)

    async def delete_conversation(self, conversation_id: str, project: str | None = None) -> bool:
        where, values = _scoped(project)
        return await self._transact(lambda db: db.execute(
            "DELETE FROM conversations WHERE id = ?" + where, (conversation_id, *values)).rowcount > 0)

    async def add_conversation_items(self, conversation_id: str, items: list[dict],
                                     project: str | None = None) -> bool:
        def _add(db):
            if _conversation_row(db, conversation_id, project) is None:
                return False
            _append_conversation(db, conversation_id, items)
            return True
        return await self._transact(_add)

    async def conversation_items(self, conversation_id: str, project: str | None = None) -> list[dict] | None:
        context = await self.conversation_context(conversation_id, project)
        return None if context is None else context[0]

    async def conversation_context(self, conversation_id: str,
                                   project: str | None = None) -> tuple[list[dict], int] | None:
        where, values = _scoped(project)

        def _context():  # one statement, one snapshot: the items are those of the revision read with them
            rows = self._db.execute(
                "SELECT c.revision, i.document FROM conversations c LEFT JOIN conversation_items i "
                "ON i.conversation_id = c.id WHERE c.id = ?" + where + " ORDER BY i.position",
                (conversation_id, *values)).fetchall()
            if not rows:
                return None
            return [orjson.loads(blob) for _, blob in rows if blob is not None], rows[0][0]
        return await self._call(_context)

    async def conversation_revision(self, conversation_id: str, project: str | None = None) -> int | None:
        return await self._call(self._revision, conversation_id, project)

    def _revision(self, conversation_id: str, project: str | None) -> int | None:
        where, values = _scoped(project)
        row = self._db.execute("SELECT revision FROM conversations WHERE id = ?" + where,
                               (conversation_id, *values)).fetchone()
        return None if row is None else row[0]

    async def delete_conversation_item(self, conversation_id: str, item_id: str,
                                       project: str | None = None) -> bool | None:
        def _delete(db):
            if _conversation_row(db, conversation_id, project) is None:
                return None
            if not db.execute("DELETE FROM conversation_items WHERE conversation_id = ? AND item_id = ?",
                              (conversation_id, item_id)).rowcount:
                return False
            db.execute("UPDATE conversations SET revision = revision + 1 WHERE id = ?", (conversation_id,))
            return True
        return await self._transact(_delete)

    # -- API keys ----------------------------------------------------------------------------

    async def create_key(self, record: KeyRecord, digest: bytes) -> None:
        await self._transact(lambda db: db.execute(
            "INSERT INTO api_keys (id, project, name, hash, created_at) VALUES (?, ?, ?, ?, ?)",
            (record.id, record.project, record.name, digest, record.created_at)))

    async def list_keys(self) -> list[KeyRecord]:
        def _list():
            rows = self._db.execute(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
            return [KeyRecord(*row) for row in rows]
        return await self._call(_list)

    async def key_by_hash(self, digest: bytes) -> KeyRecord | None:
        def _find():
            row = self._db.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = ?", (digest,)).fetchone()
            return KeyRecord(*row) if row else None
        return await self._call(_find)

    async def revoke_key(self, key_id: str) -> bool:
        return await self._transact(lambda db: db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (time.time(), key_id)).rowcount > 0)

    async def touch_key(self, key_id: str, when: float) -> None:
        await self._transact(lambda db: db.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?",
                                                   (when, key_id)))

    async def has_keys(self) -> bool:
        return await self._call(lambda: self._db.execute(
            "SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None)

    async def renew_leases(self, owner: str, lease_until: float, response_ids: Collection[str]) -> int:
        if not response_ids:
            return 0
        ids = orjson.dumps(list(response_ids))
        return await self._transact(lambda db: db.execute(
            f"UPDATE responses SET lease_until = ? WHERE owner = ? AND status IN {_in(ACTIVE)} "
            "AND id IN (SELECT value FROM json_each(?))", (lease_until, owner, *ACTIVE, ids)).rowcount)

    async def recover_expired(self, now: float, recovery: Recovery) -> list[str]:
        def _recover(db):
            rows = db.execute(f"SELECT id, document FROM responses WHERE status IN {_in(ACTIVE)} "
                              "AND lease_until IS NOT NULL AND lease_until < ?", (*ACTIVE, now)).fetchall()
            recovered = []
            for response_id, blob in rows:
                last = db.execute("SELECT MAX(last_seq) FROM event_batches WHERE response_id = ?",
                                  (response_id,)).fetchone()[0]
                number = 0 if last is None else last + 1
                document, line = recovery(orjson.loads(blob), number)
                if self._replace(db, document, ACTIVE):
                    _append_runs(db, [(response_id, [(number, number, line)])])
                    recovered.append(response_id)
            return recovered
        return await self._transact(_recover)

    async def delete_finished_before(self, cutoff: float) -> int:
        def _delete(db):
            db.execute("DELETE FROM chain_tombstones WHERE deleted_at < ?", (time.time() - TOMBSTONE_SECONDS,))
            return _delete_responses(db, f"created_at < ? AND status NOT IN {_in(ACTIVE)}", (cutoff, *ACTIVE))
        return await self._transact(_delete)
