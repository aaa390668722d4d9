"""PostgreSQL store (psycopg 3): shared state for several replicas.

Documents are stored as bytea holding the exact JSON bytes (jsonb would reorder keys).
Migrations run under an advisory lock, so replicas starting together apply each one once.
Row locks (FOR UPDATE) make cancel and lease recovery atomic across replicas.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import orjson

from parley.log import get_logger
from parley.store.base import (
    ACTIVE,
    CHAIN_COLUMNS,
    CHAIN_CONTEXT,
    CHAIN_STEP_LATERAL,
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

MIGRATION_LOCK = 0x7061726C  # "parl"
MIGRATIONS = {
    1: """
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            created_at BIGINT NOT NULL,
            status TEXT NOT NULL,
            document BYTEA NOT NULL,
            owner TEXT,
            lease_until DOUBLE PRECISION
        );
        CREATE INDEX responses_active ON responses (status, lease_until);
        CREATE INDEX responses_created ON responses (created_at);
        CREATE TABLE input_items (
            response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            item_id TEXT NOT NULL,
            document BYTEA NOT NULL,
            PRIMARY KEY (response_id, position)
        );
        CREATE TABLE events (
            response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
            sequence_number INTEGER NOT NULL,
            document BYTEA NOT NULL,
            PRIMARY KEY (response_id, sequence_number)
        );
    """,
    2: """
        CREATE TABLE event_batches (
            response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            events BYTEA NOT NULL,
            PRIMARY KEY (response_id, first_seq)
        );
        INSERT INTO event_batches (response_id, first_seq, last_seq, events)
            SELECT response_id, sequence_number, sequence_number, document FROM events;
        DROP TABLE events;
    """,
    3: """
        ALTER TABLE responses ADD COLUMN project TEXT NOT NULL DEFAULT 'default';
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            project TEXT NOT NULL,
            name TEXT NOT NULL,
            hash BYTEA NOT NULL UNIQUE,
            created_at DOUBLE PRECISION NOT NULL,
            last_used_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION
        );
    """,
    4: """
        CREATE INDEX input_items_item ON input_items (item_id);
        CREATE TABLE output_items (
            item_id TEXT PRIMARY KEY,
            response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE
        );
        CREATE INDEX output_items_response ON output_items (response_id);
        INSERT INTO output_items (item_id, response_id)
            SELECT o.value->>'id', r.id FROM responses r,
                jsonb_array_elements(convert_from(r.document, 'UTF8')::jsonb->'output') o
            WHERE o.value->>'id' IS NOT NULL
            ON CONFLICT DO NOTHING;
    """,
    5: CONVERSATION_TABLES,
    6: CHAIN_COLUMNS + """;
        UPDATE responses SET previous_id = convert_from(document, 'UTF8')::jsonb->>'previous_response_id';
        UPDATE output_items o SET position = e.ordinality - 1, document = convert_to(e.value::text, 'UTF8')
            FROM responses r,
                jsonb_array_elements(convert_from(r.document, 'UTF8')::jsonb->'output') WITH ORDINALITY e(value, ordinality)
            WHERE r.id = o.response_id AND e.value->>'id' = o.item_id;
    """,
    7: TOMBSTONE_TABLE + ";" + CONVERSATION_REVISION,
}
SCHEMA_VERSION = max(MIGRATIONS)

_UPSERT_BATCH = ("INSERT INTO event_batches (response_id, first_seq, last_seq, events) VALUES (%s, %s, %s, %s) "
                 "ON CONFLICT (response_id, first_seq) DO UPDATE SET last_seq = EXCLUDED.last_seq, "
                 "events = EXCLUDED.events")


async def _delete_responses(conn, where: str, values: tuple) -> int:
    """Delete the responses `where` selects, leaving their chains' tombstones, in one statement."""
    cursor = await conn.execute(
        f"WITH gone AS (DELETE FROM responses WHERE {where} RETURNING id), "
        f"marked AS (INSERT INTO chain_tombstones (tag, deleted_at) SELECT DISTINCT {TAG_OF.format('id')}, %s "
        "FROM gone ON CONFLICT (tag) DO UPDATE SET deleted_at = EXCLUDED.deleted_at) "
        "SELECT count(*) FROM gone", (*values, time.time()))
    return (await cursor.fetchone())[0]


def _scoped(project: str | None) -> tuple[str, tuple]:
    """The SQL condition (and its value) that keeps a lookup inside `project` (None: any)."""
    return ("", ()) if project is None else (" AND project = %s", (project,))


async def _append_conversation(conn, conversation_id: str, items: list[dict]) -> None:
    """`items` after the conversation's last item (its row is locked by the caller's update)."""
    if not items:
        return
    (start,) = await (await conn.execute(
        "UPDATE conversations SET next_position = next_position + %s, revision = revision + 1 WHERE id = %s "
        "RETURNING next_position - %s",
        (len(items), conversation_id, len(items)))).fetchone()
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO conversation_items (conversation_id, position, item_id, document) VALUES (%s, %s, %s, %s)",
            conversation_item_rows(conversation_id, start, items))


class PostgresStore(InputItemPaging):
    def __init__(self, dsn: str, max_connections: int = 10):
        self.dsn = dsn
        self.max_connections = max_connections
        self._pool = None

    async def open(self) -> None:
        from psycopg_pool import AsyncConnectionPool  # only when PostgreSQL is configured

        self._pool = AsyncConnectionPool(self.dsn, min_size=1, max_size=self.max_connections, open=False,
                                         kwargs={"autocommit": True})
        await self._pool.open(wait=True, timeout=30)
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute("CREATE TABLE IF NOT EXISTS parley_schema (version INTEGER NOT NULL)")
            row = await (await conn.execute("SELECT max(version) FROM parley_schema")).fetchone()
            version = row[0] or 0
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        await conn.execute(statement)
                await conn.execute("INSERT INTO parley_schema (version) VALUES (%s)", (target,))
                log.info("store.migrated", backend="postgres", version=target)
        log.info("store.open", backend="postgres")

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _fetchone(self, sql: str, params=()):
        async with self._pool.connection() as conn:
            return await (await conn.execute(sql, params)).fetchone()

    async def _fetchall(self, sql: str, params=()):
        async with self._pool.connection() as conn:
            return await (await conn.execute(sql, params)).fetchall()

    @staticmethod
    async def _replace(conn, response: dict, expected: tuple[str, ...]) -> bool:
        conversation_id = joins_conversation(response)
        if conversation_id is not None:  # locked first: its items are appended in this transaction
            conversation = await (await conn.execute(
                "SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (conversation_id,))).fetchone()
        cursor = await conn.execute(
            "UPDATE responses SET status = %s, document = %s WHERE id = %s AND status = ANY(%s)",
            (response["status"], orjson.dumps(response), response["id"], list(expected)))
        if cursor.rowcount == 0:
            return False
        rows = output_item_rows(response)
        if rows:  # its items, for item_reference and the chains that continue it
            async with conn.cursor() as items:
                await items.executemany(
                    "INSERT INTO output_items (item_id, response_id, position, document) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (item_id) DO UPDATE SET response_id = EXCLUDED.response_id, "
                    "position = EXCLUDED.position, document = EXCLUDED.document", rows)
        if conversation_id is not None and conversation is not None:
            inputs = await (await conn.execute("SELECT document FROM input_items WHERE response_id = %s "
                                               "ORDER BY position", (response["id"],))).fetchall()
            await _append_conversation(conn, conversation_id, [orjson.loads(blob) for (blob,) in inputs]
                                       + response["output"])
        return True

    @staticmethod
    async def _append(conn, response_id: str, events: list[EventRun]) -> None:
        if events:
            await conn.execute(_UPSERT_BATCH, (response_id, *pack(events)))

    async def create(self, response: dict, input_items: list[dict], owner: str | None = None,
                     lease_until: float | None = None, project: str = DEFAULT_PROJECT) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await self._insert(conn, response, input_items, owner, lease_until, project)

    @staticmethod
    async def _insert(conn, response: dict, input_items: list[dict], owner, lease_until, project) -> None:
        await conn.execute(
            "INSERT INTO responses (id, created_at, status, document, owner, lease_until, project, previous_id) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (response["id"], response["created_at"], response["status"], orjson.dumps(response), owner,
             lease_until, project, response.get("previous_response_id")))
        if input_items:
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO input_items (response_id, position, item_id, document) VALUES (%s, %s, %s, %s)",
                    [(response["id"], i, item["id"], orjson.dumps(item)) for i, item in enumerate(input_items)])

    async def update(self, response: dict, expected: tuple[str, ...] = ACTIVE) -> bool:
        async with self._pool.connection() as conn:
            return await self._replace(conn, response, expected)

    async def append_events(self, response_id: str, events: list[EventRun]) -> None:
        await self.append_event_batches([(response_id, events)])

    async def append_event_batches(self, batches: list[tuple[str, list[EventRun]]], creates: list[tuple] = (),
                                   finishes: list[tuple[dict, tuple[str, ...]]] = ()) -> None:
        rows = [(response_id, *pack(runs)) for response_id, runs in batches if runs]
        if rows or creates or finishes:
            async with self._pool.connection() as conn, conn.transaction():
                for create in creates:
                    await self._insert(conn, *create)
                if rows:
                    async with conn.cursor() as cursor:
                        await cursor.executemany(_UPSERT_BATCH, rows)
                for response, expected in finishes:
                    await self._replace(conn, response, expected)

    async def finish(self, response: dict, events: list[EventRun], expected: tuple[str, ...] = ACTIVE) -> bool:
        async with self._pool.connection() as conn, conn.transaction():
            if not await self._replace(conn, response, expected):
                return False
            await self._append(conn, response["id"], events)
            return True

    async def cancel(self, response_id: str, project: str | None = None) -> tuple[dict | None, bool]:
        where, values = _scoped(project)
        async with self._pool.connection() as conn, conn.transaction():
            row = await (await conn.execute(f"SELECT document FROM responses WHERE id = %s{where} FOR UPDATE",
                                            (response_id, *values))).fetchone()
            document, changed = cancel_transition(row[0] if row else None)
            if changed:
                await self._replace(conn, document, ACTIVE)
            return document, changed

    async def get(self, response_id: str, project: str | None = None) -> dict | None:
        where, values = _scoped(project)
        row = await self._fetchone("SELECT document FROM responses WHERE id = %s" + where, (response_id, *values))
        return orjson.loads(row[0]) if row else None

    async def input_items(self, response_id: str, project: str | None = None) -> list[dict] | None:
        where, values = _scoped(project)
        async with self._pool.connection() as conn:
            if not await (await conn.execute("SELECT 1 FROM responses WHERE id = %s" + where,
                                             (response_id, *values))).fetchone():
                return None
            rows = await (await conn.execute(
                "SELECT document FROM input_items WHERE response_id = %s ORDER BY position", (response_id,))).fetchall()
        return [orjson.loads(r[0]) for r in rows]

    async def chain_context(self, response_id: str, project: str) -> Chain | None:
        query = CHAIN_CONTEXT.format("%(id)s", "%(project)s", "convert_to(c.previous, 'UTF8')",
                                     CHAIN_STEP_LATERAL.format("%(id)s", "%(project)s"))
        return chain_items(response_id, await self._fetchall(query, {"id": response_id, "project": project}))

    async def chain_intact(self, response_id: str, project: str, tags) -> bool:
        row = await self._fetchone(
            "SELECT EXISTS (SELECT 1 FROM responses WHERE id = %s AND project = %s) AND NOT EXISTS "
            "(SELECT 1 FROM chain_tombstones WHERE tag = ANY(%s))", (response_id, project, list(tags)))
        return bool(row[0])

    async def find_item(self, item_id: str, project: str | None = None) -> dict | None:
        where, values = _scoped(project)
        row = await self._fetchone(FIND_ITEM.format("%s", where), (item_id, *values, item_id, *values))
        return loaded(row[0]) if row else None

    async def event_rows(self, response_id: str, starting_after: int = -1) -> list[bytes]:
        rows = await self._fetchall(
            "SELECT events FROM event_batches WHERE response_id = %s AND last_seq > %s ORDER BY first_seq",
            (response_id, starting_after))
        return [bytes(blob) for (blob,) in rows]

    async def delete(self, response_id: str, project: str | None = None) -> bool:
        where, values = _scoped(project)
        async with self._pool.connection() as conn:
            return await _delete_responses(conn, "id = %s" + where, (response_id, *values)) > 0

    # -- conversations -----------------------------------------------------------------------

    async def create_conversation(self, conversation: Conversation, items: list[dict]) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO conversations (id, project, created_at, metadata, next_position) "
                               "VALUES (%s, %s, %s, %s, 0)", (conversation.id, conversation.project,
                                                              conversation.created_at,
                                                              orjson.dumps(conversation.metadata)))
            await _append_conversation(conn, conversation.id, items)

    async def get_conversation(self, conversation_id: str, project: str | None = None) -> Conversation | None:
        where, values = _scoped(project)
        row = await self._fetchone("SELECT id, created_at, metadata FROM conversations WHERE id = %s" + where,
                                   (conversation_id, *values))
        return None if row is None else Conversation(row[0], project, row[1], orjson.loads(row[2]))

    async def update_conversation(self, conversation_id: str, metadata: dict, project: str | None = None) -> bool:
        where, values = _scoped(project)
        async with self._pool.connection() as conn:
            return (await conn.execute("UPDATE conversations SET metadata = %s WHERE id = %s" + where,
                                       (orjson.dumps(metadata), conversation_id, *values))).rowcount > 0

    async def delete_conversation(self, conversation_id: str, project: str | None = None) -> bool:
        where, values = _scoped(project)
        async with self._pool.connection() as conn:
            return (await conn.execute("DELETE FROM conversations WHERE id = %s" + where,
                                       (conversation_id, *values))).rowcount > 0

    async def add_conversation_items(self, conversation_id: str, items: list[dict],
                                     project: str | None = None) -> bool:
        where, values = _scoped(project)
        async with self._pool.connection() as conn, conn.transaction():
            if not await (await conn.execute("SELECT 1 FROM conversations WHERE id = %s" + where + " FOR UPDATE",
                                             (conversation_id, *values))).fetchone():
                return False
            await _append_conversation(conn, conversation_id, items)
            return True

    async def conversation_items(self, conversation_id: str, project: str | None = None) -> list[dict] | None:
        context = await self.conversation_context(conversation_id, project)
        return None if context is None else context[0]

    async def conversation_context(self, conversation_id: str,
                                   project: str | None = None) -> tuple[list[dict], int] | None:
        where, values = _scoped(project)
        # One statement, one snapshot: the items are those of the revision read with them.
        rows = await self._fetchall(
            "SELECT c.revision, i.document FROM conversations c LEFT JOIN conversation_items i "
            "ON i.conversation_id = c.id WHERE c.id = %s" + where + " ORDER BY i.position",
            (conversation_id, *values))
        if not rows:
            return None
        return [orjson.loads(blob) for _, blob in rows if blob is not None], rows[0][0]

    async def conversation_revision(self, conversation_id: str, project: str | None = None) -> int | None:
        where, values = _scoped(project)
        row = await self._fetchone("SELECT revision FROM conversations WHERE id = %s" + where,
                                   (conversation_id, *values))
        return None if row is None else row[0]

    async def delete_conversation_item(self, conversation_id: str, item_id: str,
                                       project: str | None = None) -> bool | None:
        where, values = _scoped(project)
        async with self._pool.connection() as conn, conn.transaction():
            if not await (await conn.execute("SELECT 1 FROM conversations WHERE id = %s" + where,
                                             (conversation_id, *values))).fetchone():
                return None
            if not (await conn.execute("DELETE FROM conversation_items WHERE conversation_id = %s AND item_id = %s",
                                       (conversation_id, item_id))).rowcount:
                return False
            await conn.execute("UPDATE conversations SET revision = revision + 1 WHERE id = %s", (conversation_id,))
            return True

    # -- API keys ----------------------------------------------------------------------------

    async def create_key(self, record: KeyRecord, digest: bytes) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("INSERT INTO api_keys (id, project, name, hash, created_at) VALUES (%s, %s, %s, %s, %s)",
                               (record.id, record.project, record.name, digest, record.created_at))

    async def list_keys(self) -> list[KeyRecord]:
        return [KeyRecord(*row) for row in await self._fetchall(
            f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at")]

    async def key_by_hash(self, digest: bytes) -> KeyRecord | None:
        row = await self._fetchone(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = %s", (digest,))
        return KeyRecord(*row) if row else None

    async def revoke_key(self, key_id: str) -> bool:
        async with self._pool.connection() as conn:
            return (await conn.execute(
                "UPDATE api_keys SET revoked_at = extract(epoch from now()) WHERE id = %s AND revoked_at IS NULL",
                (key_id,))).rowcount > 0

    async def touch_key(self, key_id: str, when: float) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("UPDATE api_keys SET last_used_at = %s WHERE id = %s", (when, key_id))

    async def has_keys(self) -> bool:
        return await self._fetchone("SELECT 1 FROM api_keys LIMIT 1") is not None

    async def renew_leases(self, owner: str, lease_until: float, response_ids: Collection[str]) -> int:
        if not response_ids:
            return 0
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE responses SET lease_until = %s WHERE owner = %s AND status = ANY(%s) AND id = ANY(%s)",
                (lease_until, owner, list(ACTIVE), list(response_ids)))
            return cursor.rowcount

    async def recover_expired(self, now: float, recovery: Recovery) -> list[str]:
        recovered = []
        async with self._pool.connection() as conn, conn.transaction():
            rows = await (await conn.execute(
                "SELECT id, document FROM responses WHERE status = ANY(%s) AND lease_until < %s "
                "FOR UPDATE SKIP LOCKED", (list(ACTIVE), now))).fetchall()
            for response_id, blob in rows:
                last = (await (await conn.execute("SELECT max(last_seq) FROM event_batches WHERE response_id = %s",
                                                  (response_id,))).fetchone())[0]
                number = 0 if last is None else last + 1
                document, line = recovery(orjson.loads(blob), number)
                if await self._replace(conn, document, ACTIVE):
                    await self._append(conn, response_id, [(number, number, line)])
                    recovered.append(response_id)
        return recovered

    async def delete_finished_before(self, cutoff: float) -> int:
        async with self._pool.connection() as conn:
            await conn.execute("DELETE FROM chain_tombstones WHERE deleted_at < %s", (time.time() - TOMBSTONE_SECONDS,))
            return await _delete_responses(conn, "created_at < %s AND NOT (status = ANY(%s))", (cutoff, list(ACTIVE)))
