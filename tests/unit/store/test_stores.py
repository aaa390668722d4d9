"""One suite, both stores: SQLite (embedded default) and PostgreSQL (several replicas)."""

import asyncio
import sqlite3
import time

import psycopg
import pytest
from parley.service.stored_events import lease_recovery
from parley.store.postgres import PostgresStore
from parley.store.sqlite import SqliteStore

from tests.support import postgres
from tests.support.stored import encode_events, stored_events


def response(response_id: str, status: str = "in_progress", created_at: int = 100, **extra) -> dict:
    return {"id": response_id, "object": "response", "created_at": created_at, "status": status, "output": [],
            "background": False, **extra}


def item(n: int) -> dict:
    return {"type": "message", "id": f"msg_{n}", "role": "user", "content": [{"type": "input_text", "text": str(n)}]}


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        store = SqliteStore(tmp_path / "nested" / "s.sqlite3")
        await store.open()
        yield store
        await store.close()
    else:
        with postgres.fresh_schema() as dsn:
            store = PostgresStore(dsn)
            await store.open()
            yield store
            await store.close()


async def test_create_append_finish_get(store):
    await store.create(response("resp_a"), [item(1), item(2)], owner="r1", lease_until=10**10)
    assert (await store.get("resp_a"))["status"] == "in_progress"
    await store.append_events("resp_a", encode_events([{"type": "x", "sequence_number": 0}]))
    await store.append_events("resp_a", encode_events([{"type": "y", "sequence_number": 1}]))
    done = response("resp_a", "completed")
    assert await store.finish(done, encode_events([{"type": "z", "sequence_number": 2}]))
    assert await store.get("resp_a") == done
    assert [e["type"] for e in await stored_events(store, "resp_a")] == ["x", "y", "z"]
    assert [e["type"] for e in await stored_events(store, "resp_a", starting_after=0)] == ["y", "z"]
    assert [i["id"] for i in await store.input_items("resp_a")] == ["msg_1", "msg_2"]
    assert not await store.finish(response("resp_a", "failed"), [])  # already finished: untouched
    assert (await store.get("resp_a"))["status"] == "completed"


async def test_document_bytes_round_trip_in_key_order(store):
    document = response("resp_o", zeta=1, alpha={"b": 1, "a": 2}, text="é ✓ \u2028")
    await store.create(document, [])
    assert list((await store.get("resp_o")).keys()) == list(document.keys())
    assert (await store.get("resp_o"))["text"] == "é ✓ \u2028"


async def test_duplicate_create_fails_and_leaves_the_first_intact(store):
    await store.create(response("resp_x"), [item(1)])
    with pytest.raises((sqlite3.IntegrityError, Exception)):
        await store.create(response("resp_x", "completed"), [item(7), item(8)])
    assert (await store.get("resp_x"))["status"] == "in_progress"
    assert [i["id"] for i in await store.input_items("resp_x")] == ["msg_1"]


async def test_cancel_transitions_once(store):
    await store.create(response("resp_c", "queued", background=True), [])
    document, changed = await store.cancel("resp_c")
    assert changed and document["status"] == "cancelled"
    document, changed = await store.cancel("resp_c")
    assert not changed and document["status"] == "cancelled"
    assert await store.cancel("resp_missing") == (None, False)
    # The runner may still write its partial output over a cancelled row, nothing else may.
    assert not await store.finish(response("resp_c", "completed"), [])
    assert await store.finish(response("resp_c", "cancelled", output=["partial"]), [], expected=("cancelled",))
    assert (await store.get("resp_c"))["output"] == ["partial"]


async def test_concurrent_cancels_change_it_once(store):
    await store.create(response("resp_cc", background=True), [])
    results = await asyncio.gather(*(store.cancel("resp_cc") for _ in range(5)))
    assert sum(changed for _, changed in results) == 1


async def test_leases_renew_and_expired_ones_are_failed(store):
    await store.create(response("resp_live"), [], owner="alive", lease_until=50)
    await store.create(response("resp_dead"), [], owner="dead", lease_until=50)
    await store.append_events("resp_dead", encode_events([{"type": "response.created", "sequence_number": 0},
                                                          {"type": "response.in_progress", "sequence_number": 1}]))
    await store.create(response("resp_done", "completed"), [], owner="dead", lease_until=50)
    await store.create(response("resp_orphan"), [], owner="alive", lease_until=50)  # alive, but not running it
    assert await store.renew_leases("alive", 1000, ["resp_live", "resp_dead", "resp_done"]) == 1
    assert await store.renew_leases("alive", 1000, []) == 0
    recovered = await store.recover_expired(100, lease_recovery)
    assert sorted(recovered) == ["resp_dead", "resp_orphan"]
    dead = await store.get("resp_dead")
    assert dead["status"] == "failed" and "lease expired" in dead["error"]["message"]
    events = await stored_events(store, "resp_dead")
    assert events[-1]["type"] == "response.failed" and events[-1]["sequence_number"] == 2
    assert (await store.get("resp_live"))["status"] == "in_progress"
    assert (await store.get("resp_done"))["status"] == "completed"
    assert await store.recover_expired(100, lease_recovery) == []


async def test_retention_deletes_only_old_finished_responses(store):
    await store.create(response("resp_old", "completed", created_at=10), [item(1)])
    await store.create(response("resp_old_running", "in_progress", created_at=10), [])
    await store.create(response("resp_new", "completed", created_at=1000), [])
    assert await store.delete_finished_before(500) == 1
    assert await store.get("resp_old") is None and await store.input_items("resp_old") is None
    assert await store.get("resp_old_running") is not None and await store.get("resp_new") is not None


async def test_delete_cascades_and_reports_absence(store):
    await store.create(response("resp_z"), [item(1)])
    await store.finish(response("resp_z", "completed"), encode_events([{"type": "x", "sequence_number": 0}]))
    assert await store.delete("resp_z") is True
    assert await store.get("resp_z") is None
    assert await store.input_items("resp_z") is None
    assert await stored_events(store, "resp_z") == []
    assert await store.delete("resp_z") is False


async def test_pagination(store):
    await store.create(response("resp_p"), [item(n) for n in range(6)])
    page = await store.list_input_items("resp_p", limit=2, order="asc", after="msg_1", before=None)
    assert [i["id"] for i in page.items] == ["msg_2", "msg_3"] and page.has_more
    assert await store.list_input_items("resp_nope", limit=20, order="asc", after=None, before=None) is None


async def test_reopening_applies_no_migration_twice(store):
    if isinstance(store, SqliteStore):
        again = SqliteStore(store.path)
    else:
        again = PostgresStore(store.dsn)
    await again.open()
    await store.create(response("resp_r"), [])
    assert (await again.get("resp_r"))["id"] == "resp_r"
    await again.close()


async def test_a_batch_is_one_row_and_resumes_from_inside_it(store):
    await store.create(response("resp_b"), [])
    await store.append_events("resp_b", encode_events([{"type": "e", "sequence_number": n} for n in range(5)]))
    await store.append_events("resp_b", encode_events([{"type": "e", "sequence_number": n} for n in range(5, 8)]))
    assert [e["sequence_number"] for e in await stored_events(store, "resp_b", starting_after=2)] == [3, 4, 5, 6, 7]
    assert [e["sequence_number"] for e in await stored_events(store, "resp_b", starting_after=4)] == [5, 6, 7]
    assert await stored_events(store, "resp_b", starting_after=7) == []


async def test_one_write_creates_appends_and_finishes_only_what_is_expected(store):
    """The event sink's transaction: rows, then each response's runs as one row, then the
    final documents, each only where the stored status allows it."""
    await store.create(response("resp_done", "completed"), [])
    runs = {rid: [(0, 1, b'{"type":"a","sequence_number":0}\n{"type":"b","sequence_number":1}'),
                  (2, 2, b'{"type":"c","sequence_number":2}')] for rid in ("resp_new", "resp_old")}
    await store.create(response("resp_old"), [])
    await store.append_event_batches(
        list(runs.items()),
        creates=[(response("resp_new"), [item(1), item(2)], "r1", 10.0, "default")],
        finishes=[(response("resp_new", "completed", output=["x"]), ("in_progress",)),
                  (response("resp_old", "cancelled"), ("queued",)),          # not expected: untouched
                  (response("resp_done", "failed"), ("in_progress",))])      # finished: untouched
    assert (await store.get("resp_new"))["output"] == ["x"]
    assert (await store.get("resp_old"))["status"] == "in_progress"
    assert (await store.get("resp_done"))["status"] == "completed"
    assert [i["id"] for i in await store.input_items("resp_new")] == ["msg_1", "msg_2"]
    for rid in runs:
        assert [e["type"] for e in await stored_events(store, rid)] == ["a", "b", "c"]
        assert [e["sequence_number"] for e in await stored_events(store, rid, starting_after=0)] == [1, 2]


async def test_a_failed_write_leaves_nothing_half_written(store):
    await store.create(response("resp_dup"), [])
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.UniqueViolation)):
        await store.append_event_batches([("resp_dup", [(0, 0, b'{"type":"a","sequence_number":0}')])],
                                         creates=[(response("resp_dup"), [], None, None, "default")],  # a duplicate id
                                         finishes=[(response("resp_dup", "completed"), ("in_progress",))])
    assert await stored_events(store, "resp_dup") == []
    assert (await store.get("resp_dup"))["status"] == "in_progress"


async def test_an_item_is_found_by_id_within_its_project(store):
    answer = {"type": "message", "id": "msg_out", "role": "assistant", "status": "completed",
              "content": [{"type": "output_text", "text": "4", "annotations": [], "logprobs": []}]}
    await store.create(response("resp_i"), [item(1)], project="alpha")
    assert await store.find_item("msg_out", "alpha") is None  # not finished: no output yet
    await store.finish(response("resp_i", "completed", output=[answer]), [])
    assert await store.find_item("msg_out", "alpha") == answer
    assert await store.find_item("msg_1", "alpha") == item(1)
    assert await store.find_item("msg_out", "beta") is None and await store.find_item("msg_1", "beta") is None
    # An event-sink write that finishes a response deleted meanwhile still writes the rest.
    await store.create(response("resp_gone"), [])
    await store.delete("resp_gone")
    await store.append_event_batches([], finishes=[(response("resp_gone", "completed",
                                                             output=[{**answer, "id": "msg_gone"}]),
                                                    ("in_progress",))])
    assert await store.find_item("msg_gone") is None
    await store.delete("resp_i")
    assert await store.find_item("msg_out", "alpha") is None and await store.find_item("msg_1", "alpha") is None


async def test_a_conversation_is_an_ordered_log_within_its_project(store):
    from parley.store.base import Conversation

    await store.create_conversation(Conversation("conv_1", "alpha", 5, {"topic": "x"}), [item(1), item(2)])
    assert await store.get_conversation("conv_1", "beta") is None
    assert (await store.get_conversation("conv_1", "alpha")).metadata == {"topic": "x"}
    assert await store.add_conversation_items("conv_1", [item(3)], "alpha")
    assert not await store.add_conversation_items("conv_1", [item(4)], "beta")
    assert [i["id"] for i in await store.conversation_items("conv_1", "alpha")] == ["msg_1", "msg_2", "msg_3"]
    assert await store.delete_conversation_item("conv_1", "msg_2", "alpha") is True
    assert await store.delete_conversation_item("conv_1", "msg_2", "alpha") is False
    assert await store.delete_conversation_item("conv_1", "msg_2", "beta") is None
    assert await store.update_conversation("conv_1", {"topic": "y"}, "alpha")
    assert not await store.update_conversation("conv_1", {}, "beta")
    assert (await store.get_conversation("conv_1")).metadata == {"topic": "y"}
    assert await store.delete_conversation("conv_1", "alpha")
    assert await store.conversation_items("conv_1", "alpha") is None


async def test_a_finished_response_joins_its_conversation_once_and_only_when_it_completes(store):
    from parley.store.base import Conversation

    await store.create_conversation(Conversation("conv_2", "default", 5, {}), [item(0)])
    answer = {"type": "message", "id": "msg_answer", "role": "assistant", "content": []}
    for rid, status in (("resp_ok", "completed"), ("resp_bad", "failed")):
        await store.create(response(rid, conversation={"id": "conv_2"}), [item(1)])
        done = response(rid, status, conversation={"id": "conv_2"}, output=[answer])
        await store.append_event_batches([], finishes=[(done, ("in_progress",))])
        await store.append_event_batches([], finishes=[(done, ("in_progress",))])  # not expected now: no-op
    assert [i["id"] for i in await store.conversation_items("conv_2")] == ["msg_0", "msg_1", "msg_answer"]
    await store.create(response("resp_fin", conversation={"id": "conv_2"}), [item(5)])
    assert await store.finish(response("resp_fin", "incomplete", conversation={"id": "conv_2"}), [])
    assert [i["id"] for i in await store.conversation_items("conv_2")][-1] == "msg_5"


async def test_a_chains_context_is_one_query_oldest_first_and_breaks_where_a_response_is_gone(store):
    from parley.store.base import ChainBroken

    def answer(n):
        return {"type": "message", "id": f"msg_out{n}", "role": "assistant", "content": []}

    previous = None
    for n in range(3):
        rid = f"resp_c{n}"
        await store.create(response(rid, previous_response_id=previous), [item(n)], project="alpha")
        await store.finish(response(rid, "completed", previous_response_id=previous, output=[answer(n)]), [])
        previous = rid
    # A branch: another continuation of the first response sees only its own line.
    await store.create(response("resp_branch", previous_response_id="resp_c0"), [item(9)], project="alpha")
    await store.finish(response("resp_branch", "completed", previous_response_id="resp_c0", output=[answer(9)]), [])
    chain = await store.chain_context("resp_c2", "alpha")
    assert [i["id"] for i in chain.items] == ["msg_0", "msg_out0", "msg_1", "msg_out1", "msg_2", "msg_out2"]
    assert chain.tags == {"c0", "c1", "c2"}  # ids from before chain tags: each its own
    assert [i["id"] for i in (await store.chain_context("resp_branch", "alpha")).items] == [
        "msg_0", "msg_out0", "msg_9", "msg_out9"]
    assert await store.chain_context("resp_c2", "beta") is None
    assert await store.chain_context("resp_nope", "alpha") is None
    await store.delete("resp_c1", "alpha")
    with pytest.raises(ChainBroken) as broken:
        await store.chain_context("resp_c2", "alpha")
    assert broken.value.missing == "resp_c1"


async def test_a_deletion_leaves_its_chains_tombstone_so_a_kept_chain_is_known_to_be_broken(store):
    tag = "0123456789abcdef"
    first, second, other = f"resp_{tag}{'1' * 32}", f"resp_{tag}{'2' * 32}", f"resp_{'f' * 16}{'3' * 32}"
    for rid in (first, second, other):
        await store.create(response(rid), [item(0)], project="alpha")
        await store.finish(response(rid, "completed"), [])
    assert await store.chain_intact(second, "alpha", {tag})
    assert not await store.chain_intact(second, "beta", {tag})  # another project's: absent
    assert not await store.chain_intact("resp_nope", "alpha", {tag})
    assert not await store.delete(first, "beta")  # nothing deleted: no tombstone
    assert await store.chain_intact(second, "alpha", {tag})
    assert await store.delete(first, "alpha")
    assert not await store.chain_intact(second, "alpha", {tag})  # still there, but its chain lost one
    assert await store.chain_intact(other, "alpha", {"f" * 16})
    # Retention leaves tombstones too.
    assert await store.delete_finished_before(time.time() + 60) == 2
    assert not await store.chain_intact(other, "alpha", {"f" * 16})


async def test_a_conversations_revision_counts_every_change_of_its_items(store):
    from parley.store.base import Conversation

    await store.create_conversation(Conversation("conv_r", "alpha", 5, {}), [item(1)])
    items, start = await store.conversation_context("conv_r", "alpha")
    assert [i["id"] for i in items] == ["msg_1"] and await store.conversation_revision("conv_r", "alpha") == start
    assert await store.conversation_revision("conv_r", "beta") is None
    assert await store.conversation_context("conv_r", "beta") is None
    await store.add_conversation_items("conv_r", [item(2)], "alpha")
    assert await store.conversation_revision("conv_r") == start + 1
    await store.update_conversation("conv_r", {"topic": "y"}, "alpha")  # metadata is not an item
    assert await store.conversation_revision("conv_r") == start + 1
    assert await store.delete_conversation_item("conv_r", "msg_1", "alpha")
    assert not await store.delete_conversation_item("conv_r", "msg_1", "alpha")  # nothing changed
    assert await store.conversation_revision("conv_r") == start + 2
    await store.create(response("resp_j", conversation={"id": "conv_r"}), [item(3)], project="alpha")
    await store.finish(response("resp_j", "completed", conversation={"id": "conv_r"}), [])
    items, revision = await store.conversation_context("conv_r", "alpha")
    assert [i["id"] for i in items] == ["msg_2", "msg_3"] and revision == start + 3  # one join, one change
    await store.create_conversation(Conversation("conv_empty", "alpha", 5, {}), [])
    assert (await store.conversation_context("conv_empty", "alpha"))[0] == []
