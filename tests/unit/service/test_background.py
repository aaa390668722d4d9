"""Background responses, cancel, follow, admission and shutdown, against the scripted engine."""

import asyncio

import pytest
from parley.errors import ApiError
from parley.service.admission import Admission
from parley.service.responses import ResponsesService
from parley.store.sqlite import SqliteStore

from tests.fakes.engines import ScriptedEngine
from tests.support.streams import check_stream, event_types

MODEL = "scripted"


@pytest.fixture
async def service(tmp_path):
    store = SqliteStore(tmp_path / "bg.sqlite3")
    await store.open()
    engine = ScriptedEngine(model_id=MODEL, script=["w "] * 40, delay=0.01)
    service = ResponsesService(engine, store, admission=Admission(2, 2), follow_poll_seconds=0.2)
    yield service
    await service.shutdown(1)
    await store.close()


async def wait_for_status(service, response_id, statuses, timeout=10):
    for _ in range(int(timeout / 0.02)):
        document = await service.store.get(response_id)
        if document["status"] in statuses:
            return document
        await asyncio.sleep(0.02)
    raise AssertionError(f"{response_id} never reached {statuses}: {document['status']}")


async def test_background_returns_queued_at_once_and_completes(service):
    queued = await service.create("default", {"model": MODEL, "input": "hi", "background": True})
    assert queued["status"] == "queued" and queued["background"] is True and queued["output"] == []
    done = await wait_for_status(service, queued["id"], ("completed",))
    assert done["output"][0]["content"][0]["text"] == "w " * 40
    events = [e async for batch in service.follow("default", queued["id"]) for e in batch]
    assert event_types(events)[:4] == ["response.created", "response.queued", "response.in_progress",
                                       "response.output_item.added"]
    assert check_stream(events)["status"] == "completed"


async def test_follow_from_the_middle_then_live(service):
    queued = await service.create("default", {"model": MODEL, "input": "hi", "background": True})
    await asyncio.sleep(0.1)
    events = [e async for batch in service.follow("default", queued["id"], starting_after=5) for e in batch]
    assert events[0]["sequence_number"] == 6
    numbers = [e["sequence_number"] for e in events]
    assert numbers == list(range(6, 6 + len(numbers)))
    assert events[-1]["type"] == "response.completed"


async def test_dropping_a_follower_does_not_stop_the_generation(service):
    queued = await service.create("default", {"model": MODEL, "input": "hi", "background": True})
    follower = service.follow("default", queued["id"])
    async for batch in follower:
        if any(event["type"] == "response.output_text.delta" for event in batch):
            break
    await follower.aclose()
    assert (await wait_for_status(service, queued["id"], ("completed",)))["usage"]["output_tokens"] == 40


async def test_cancel_stops_the_engine_and_is_idempotent(service):
    queued = await service.create("default", {"model": MODEL, "input": "hi", "background": True})
    while service.engine.emitted_tokens < 3:
        await asyncio.sleep(0.01)
    cancelled = await service.cancel("default", queued["id"])
    assert cancelled["status"] == "cancelled"
    produced = service.engine.emitted_tokens
    assert produced < 40 and service.engine.aborted == 1
    await asyncio.sleep(0.1)
    assert service.engine.emitted_tokens == produced  # no token after the cancel
    again = await service.cancel("default", queued["id"])
    assert again["status"] == "cancelled"
    stored = await service.get("default", queued["id"])
    assert stored["status"] == "cancelled" and stored["output"][0]["status"] == "incomplete"


async def test_cancel_rules(service):
    foreground = await service.create("default", {"model": MODEL, "input": "hi"})
    with pytest.raises(ApiError) as info:
        await service.cancel("default", foreground["id"])
    assert info.value.kind.http_status == 400
    finished = await service.create("default", {"model": MODEL, "input": "hi", "background": True})
    await wait_for_status(service, finished["id"], ("completed",))
    with pytest.raises(ApiError) as info:
        await service.cancel("default", finished["id"])
    assert info.value.kind.http_status == 409
    with pytest.raises(ApiError) as info:
        await service.cancel("default", "resp_missing")
    assert info.value.kind.http_status == 404


async def test_admission_refuses_beyond_running_plus_queued(service):
    ids = [(await service.create("default", {"model": MODEL, "input": "hi", "background": True}))["id"] for _ in range(4)]
    with pytest.raises(ApiError) as info:
        await service.create("default", {"model": MODEL, "input": "hi", "background": True})
    assert info.value.kind.http_status == 429 and info.value.code == "server_busy"
    assert service.admission.running + service.admission.waiting == 4
    for response_id in ids:
        await wait_for_status(service, response_id, ("completed",))
    assert service.admission.running == service.admission.waiting == 0
    await service.create("default", {"model": MODEL, "input": "hi", "background": True})


async def test_shutdown_fails_what_outlives_the_grace(service):
    service.engine.delay = 0.2
    queued = await service.create("default", {"model": MODEL, "input": "hi", "background": True})
    await asyncio.sleep(0.3)
    await service.shutdown(0.2)
    stored = await service.store.get(queued["id"])
    assert stored["status"] == "failed" and "shut down" in stored["error"]["message"]
    assert (await service.events.read(queued["id"]))[-1]["type"] == "response.failed"
    with pytest.raises(ApiError) as info:
        await service.create("default", {"model": MODEL, "input": "hi"})
    assert info.value.kind.http_status == 503


async def test_expired_lease_of_a_dead_replica_is_failed_by_maintenance(tmp_path):
    store = SqliteStore(tmp_path / "lease.sqlite3")
    await store.open()
    dead = ResponsesService(ScriptedEngine(model_id=MODEL), store, replica_id="dead", lease_seconds=-1)
    prepared = await dead.prepare("default", {"model": MODEL, "input": "hi"})
    await dead.drain()  # its row reached the store; then the replica died before generating
    alive = ResponsesService(ScriptedEngine(model_id=MODEL), store, replica_id="alive")
    await alive.maintain()
    stored = await store.get(prepared.response["id"])
    assert stored["status"] == "failed" and "lease expired" in stored["error"]["message"]
    await store.close()


async def test_retention_through_maintenance(tmp_path):
    store = SqliteStore(tmp_path / "ttl.sqlite3")
    await store.open()
    service = ResponsesService(ScriptedEngine(model_id=MODEL), store)
    old = await service.create("default", {"model": MODEL, "input": "hi"})
    await service.maintain(response_ttl_seconds=3600)
    assert await store.get(old["id"]) is not None
    document = await store.get(old["id"])
    document["created_at"] -= 7200
    await store.finish(document, [], expected=("completed",))
    await store._transact(lambda db: db.execute("UPDATE responses SET created_at = ? WHERE id = ?",
                                                (document["created_at"], old["id"])))
    await service.maintain(response_ttl_seconds=3600)
    assert await store.get(old["id"]) is None
    await store.close()
