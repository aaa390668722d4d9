"""Acknowledged means durable: what a client sees of a stored response is in the store first.

The store is read directly (no flush) at the moment the client would see each event; a
write-behind pipeline fails these tests (`relaxed` does, see the last test)."""

import orjson
import pytest
from parley.errors import ApiError
from parley.service.event_log import WritePolicy
from parley.service.events import UNACKNOWLEDGED_MESSAGE
from parley.service.stored_events import decode_rows

from tests.fakes.engines import ScriptedEngine
from tests.support.pipeline import service_on, stream

MODEL = "scripted"
RELAXED = WritePolicy(acknowledge_durably=False)


def engine() -> ScriptedEngine:
    return ScriptedEngine(model_id=MODEL, context_window=256, script=["Hel", "lo", " there", "!"])


async def test_the_row_is_stored_as_created_before_the_client_sees_its_id(tmp_path):
    async with service_on(tmp_path / "g.sqlite3", engine()) as service:
        prepared = await service.prepare("default", {"model": MODEL, "input": "hi", "stream": True})
        batches = service.run(prepared)
        first = await anext(batches)
        assert first[0]["type"] == "response.created"
        stored = await service.store.get(first[0]["response"]["id"])
        assert stored is not None and stored["status"] == "in_progress" and stored["output"] == []
        assert decode_rows(await service.store.event_rows(stored["id"])) == list(first)
        async for _ in batches:
            pass


@pytest.mark.parametrize("script,terminal", [(["Hel", "lo"], "response.completed"),
                                             (["tok"] * 40, "response.incomplete")])
async def test_the_final_document_and_every_event_are_stored_before_the_terminal_event(tmp_path, script, terminal):
    scripted = ScriptedEngine(model_id=MODEL, context_window=256, script=script)
    async with service_on(tmp_path / "g.sqlite3", scripted) as service:
        prepared = await service.prepare("default", {"model": MODEL, "input": "hi", "stream": True, "max_output_tokens": 16})
        seen = []
        async for batch in service.run(prepared):
            seen += batch
            if batch[-1]["type"] == terminal:
                response_id = batch[-1]["response"]["id"]
                assert await service.store.get(response_id) == batch[-1]["response"]
                assert decode_rows(await service.store.event_rows(response_id)) == seen
        assert seen[-1]["type"] == terminal


async def test_a_failed_engine_is_stored_failed_before_the_client_sees_it(tmp_path):
    failing = engine()
    failing.fail_after = 2
    async with service_on(tmp_path / "g.sqlite3", failing) as service:
        prepared = await service.prepare("default", {"model": MODEL, "input": "hi", "stream": True})
        async for batch in service.run(prepared):
            if batch[-1]["type"] == "response.failed":
                stored = await service.store.get(batch[-1]["response"]["id"])
                assert stored["status"] == "failed" and stored == batch[-1]["response"]


async def test_a_store_that_cannot_write_refuses_the_request_before_anything_is_sent(tmp_path, capsys):
    from parley import log

    async with service_on(tmp_path / "g.sqlite3", engine()) as service:
        async def broken(*args, **kwargs):
            raise OSError("disk full")

        service.store.append_event_batches = broken
        log.configure("json", "info")
        try:
            with pytest.raises(ApiError) as refused:
                await stream(service, input="hi")
            assert refused.value.kind.http_status == 503 and refused.value.code == "store_unavailable"
            assert "disk full" in capsys.readouterr().err
        finally:
            log.configure("console", "warning")


async def test_relaxed_writes_behind(tmp_path):
    """The same check as the first test, on `relaxed`: the row is not there yet when the client
    sees its id (what these tests guard against)."""
    async with service_on(tmp_path / "g.sqlite3", engine(), write_policy=RELAXED) as service:
        prepared = await service.prepare("default", {"model": MODEL, "input": "hi", "stream": True})
        batches = service.run(prepared)
        first = await anext(batches)
        assert await service.store.get(first[0]["response"]["id"]) is None
        await batches.aclose()


async def test_relaxed_a_failed_write_is_logged_not_swallowed(tmp_path, capsys):
    from parley import log

    async with service_on(tmp_path / "g.sqlite3", engine(), write_policy=RELAXED) as service:
        async def broken(*args, **kwargs):
            raise OSError("disk full")

        service.store.append_event_batches = broken  # the log's write (events and final document) fails
        log.configure("json", "info")
        try:
            events = await stream(service, input="hi")  # the client still gets its whole stream
            assert events[-1]["type"] == "response.completed"
            await service.drain()
            err = capsys.readouterr().err
            failures = [orjson.loads(line) for line in err.splitlines() if "events.write_failed" in line]
            assert sum(f["events"] for f in failures) == len(events) and sum(f["finished"] for f in failures) == 1
            assert "disk full" in err
        finally:
            log.configure("console", "warning")


async def test_a_response_whose_final_write_failed_is_left_to_expire_not_renewed(tmp_path):
    import sqlite3

    async with service_on(tmp_path / "g.sqlite3", engine()) as service:
        prepared = await service.prepare("default", {"model": MODEL, "input": "hi", "stream": True})
        response_id = prepared.response["id"]
        batches = service.run(prepared)
        await anext(batches)  # the row is stored
        assert response_id in service.generation.running
        working = service.store.append_event_batches

        async def broken(*args, **kwargs):
            raise OSError("disk full")

        service.store.append_event_batches = broken
        seen = [event async for batch in batches for event in batch]
        assert not any(event["type"] == "response.completed" for event in seen)  # never acknowledged
        # ...and the client is told, in the stream's own `error` event, numbered after the rest.
        assert seen[-1] == {"type": "error", "code": "store_unavailable", "message": UNACKNOWLEDGED_MESSAGE,
                            "param": None, "sequence_number": seen[-2]["sequence_number"] + 1}
        service.store.append_event_batches = working

        def lease() -> float:
            with sqlite3.connect(tmp_path / "g.sqlite3") as db:
                return db.execute("SELECT lease_until FROM responses WHERE id = ?", (response_id,)).fetchone()[0]

        before = lease()
        assert response_id not in service.generation.running
        await service.maintain()  # renews what runs here: not this one, which recovery will fail
        assert lease() == before
        assert (await service.store.get(response_id))["status"] == "in_progress"


async def test_a_non_streaming_create_whose_final_write_failed_is_a_503(tmp_path):
    async with service_on(tmp_path / "g.sqlite3", engine()) as service:
        prepared = await service.prepare("default", {"model": MODEL, "input": "hi"})
        original = service.store.append_event_batches
        writes = 0

        async def fails_after_the_row(*args, **kwargs):
            nonlocal writes
            writes += 1
            if writes > 1:  # the row is stored (the id acknowledged); the final write fails
                raise OSError("disk full")
            await original(*args, **kwargs)

        service.store.append_event_batches = fails_after_the_row
        with pytest.raises(ApiError) as refused:
            await service.create_prepared(prepared)
        assert refused.value.kind.http_status == 503 and refused.value.code == "store_unavailable"
