import sqlite3

import pytest
from parley.store import sqlite
from parley.store.base import paginate
from parley.store.sqlite import SqliteStore

from tests.support.stored import encode_events, stored_events


async def test_state_survives_a_restart_in_wal_mode(tmp_path):
    path = tmp_path / "durable.sqlite3"
    first = SqliteStore(path)
    await first.open()
    await first.create({"id": "resp_d", "created_at": 1, "status": "in_progress", "output": []}, [])
    await first.finish({"id": "resp_d", "created_at": 1, "status": "completed", "output": []},
                       encode_events([{"type": "x", "sequence_number": 0}]))
    await first.close()
    second = SqliteStore(path)
    await second.open()
    assert (await second.get("resp_d"))["status"] == "completed"
    assert len(await stored_events(second, "resp_d")) == 1
    await second.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_paginate_orders_and_cursors():
    items = [{"id": f"msg_{n}"} for n in range(6)]
    assert [i["id"] for i in paginate(items, limit=3, order="desc", after=None, before=None).items] == \
        ["msg_5", "msg_4", "msg_3"]
    page = paginate(items, limit=2, order="asc", after="msg_1", before="msg_5")
    assert [i["id"] for i in page.items] == ["msg_2", "msg_3"] and page.has_more
    assert paginate(items, limit=2, order="asc", after="msg_5", before=None).items == []


async def test_events_stored_one_per_row_before_v3_survive_the_migration(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    for version in (1, 2):  # a database as schema v2 left it, with one row per event
        from parley.store.sqlite import MIGRATIONS

        for statement in MIGRATIONS[version].split(";"):
            if statement.strip():
                db.execute(statement)
    db.execute("PRAGMA user_version=2")
    db.execute("INSERT INTO responses (id, created_at, status, document) VALUES ('resp_o', 1, 'completed', '{}')")
    for n in range(3):
        db.execute("INSERT INTO events VALUES ('resp_o', ?, ?)", (n, f'{{"type":"e","sequence_number":{n}}}'))
    db.commit()
    db.close()
    store = SqliteStore(path)
    await store.open()
    assert [e["sequence_number"] for e in await stored_events(store, "resp_o")] == [0, 1, 2]
    assert [e["sequence_number"] for e in await stored_events(store, "resp_o", starting_after=1)] == [2]
    await store.close()


async def test_writes_larger_than_one_statement_are_split(tmp_path, monkeypatch):
    """The sink writes many rows per statement; past SQLite's bound-values limit it must split."""
    monkeypatch.setattr(sqlite, "_MAX_VARIABLES", 13)  # 3 rows of 4 values, 2 of 6, 3 of 4 per statement
    store = SqliteStore(tmp_path / "split.sqlite3")
    await store.open()
    # SQLite itself refuses a statement over the limit, so an unsplit write cannot pass.
    await store._call(lambda: store._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 13))
    try:
        ids = [f"resp_{n}" for n in range(7)]
        creates = [({"id": rid, "created_at": 1, "status": "in_progress", "output": []},
                    [{"id": f"msg_{rid}_{k}", "type": "message"} for k in range(3)], "r1", 10.0, "default") for rid in ids]
        batches = [(rid, [(0, 0, b'{"sequence_number":0}')]) for rid in ids]
        finishes = [({"id": rid, "created_at": 1, "status": "completed", "output": [rid]}, ("in_progress",))
                    for rid in ids]
        await store.append_event_batches(batches, creates=creates, finishes=finishes)
        for rid in ids:
            assert (await store.get(rid))["output"] == [rid]
            assert len(await store.input_items(rid)) == 3
            assert await stored_events(store, rid) == [{"sequence_number": 0}]
    finally:
        await store.close()


async def test_an_sqlite_too_old_for_the_store_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite.sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite.sqlite3, "sqlite_version", "3.31.1")
    store = SqliteStore(tmp_path / "old.sqlite3")
    with pytest.raises(RuntimeError, match=r"needs SQLite 3\.33\.0 or newer; this Python links 3\.31\.1"):
        await store.open()
    assert not (tmp_path / "old.sqlite3").exists()
    await store.close()
