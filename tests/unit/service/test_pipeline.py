"""The service pipeline against the scripted engine: exact event sequences and stored state."""

import asyncio

import pytest
from parley.errors import ApiError

from tests.fakes.engines import ScriptedEngine
from tests.support.golden import assert_golden
from tests.support.pipeline import service_on, stream
from tests.support.streams import check_stream, event_types, text_message_sequence

MODEL = "scripted"


@pytest.fixture
async def service(tmp_path):
    engine = ScriptedEngine(model_id=MODEL, context_window=256, script=["Hel", "lo", " there", "!"])
    async with service_on(tmp_path / "p.sqlite3", engine) as service:
        yield service


async def test_stream_exact_sequence_and_invariants(service):
    events = await stream(service, input="hi")
    assert event_types(events) == text_message_sequence(4)
    response = check_stream(events)
    assert response["status"] == "completed" and response["output"][0]["content"][0]["text"] == "Hello there!"
    assert response["usage"]["output_tokens"] == 4
    assert response["usage"]["total_tokens"] == response["usage"]["input_tokens"] + 4
    assert_golden("stream_events", events)


async def test_created_event_shows_in_progress_and_no_usage(service):
    events = await stream(service, input="hi")
    created = events[0]["response"]
    assert created["status"] == "in_progress" and created["usage"] is None and created["output"] == []


async def test_non_streaming_document_equals_stored_and_golden(service):
    response = await service.create("default", {"model": MODEL, "input": "hi", "instructions": "Be kind.",
                                     "metadata": {"k": "v"}, "user": "u"})
    assert response == await service.get("default", response["id"])
    assert_golden("response_completed", response)


async def test_max_output_tokens_makes_it_incomplete(service):
    service.engine.script = ["w"] * 40
    events = await stream(service, input="hi", max_output_tokens=16)
    assert event_types(events) == text_message_sequence(16, "response.incomplete")
    response = check_stream(events)
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"


async def test_engine_failure_mid_stream_is_in_band_and_stored_failed(service):
    service.engine.fail_after = 2
    events = await stream(service, input="hi")
    assert events[-1]["type"] == "response.failed"
    response = check_stream(events)
    assert response["status"] == "failed" and response["error"]["code"] == "server_error"
    assert (await service.get("default", response["id"]))["status"] == "failed"


async def test_engine_failure_without_stream_is_a_server_error(service):
    service.engine.fail_after = 1
    with pytest.raises(ApiError) as info:
        await service.create("default", {"model": MODEL, "input": "hi"})
    assert info.value.kind.http_status == 500


async def test_consumer_leaving_stops_the_engine_and_stores_cancelled(service):
    service.engine.script = ["w"] * 50
    service.engine.delay = 0.001
    prepared = await service.prepare("default", {"model": MODEL, "input": "hi", "stream": True})
    events = service.run(prepared)
    async for batch in events:
        if any(event["type"] == "response.output_text.delta" for event in batch):
            break
    await events.aclose()
    await service.drain()
    assert service.engine.aborted == 1
    assert service.engine.emitted_tokens <= 2
    stored = await service.get("default", prepared.response["id"])
    assert stored["status"] == "cancelled"


async def test_store_false_keeps_nothing(service):
    response = await service.create("default", {"model": MODEL, "input": "hi", "store": False})
    with pytest.raises(ApiError) as info:
        await service.get("default", response["id"])
    assert info.value.kind.http_status == 404


async def test_previous_response_id_carries_input_and_output_not_instructions(service):
    first = await service.create("default", {"model": MODEL, "input": "first question", "instructions": "Old rules."})
    await service.create("default", {"model": MODEL, "input": "second question", "previous_response_id": first["id"],
                          "instructions": "New rules."})
    prompt = service.engine.prompts[-1]
    assert [(m.role, m.content) for m in prompt] == [
        ("developer", "New rules."), ("user", "first question"), ("assistant", "Hello there!"),
        ("user", "second question")]


async def test_chain_of_three_is_assembled_oldest_first(service):
    first = await service.create("default", {"model": MODEL, "input": "one"})
    second = await service.create("default", {"model": MODEL, "input": "two", "previous_response_id": first["id"]})
    await service.create("default", {"model": MODEL, "input": "three", "previous_response_id": second["id"]})
    users = [m.content for m in service.engine.prompts[-1] if m.role == "user"]
    assert users == ["one", "two", "three"]


async def test_unknown_previous_response_is_openais_400(service):
    with pytest.raises(ApiError) as info:
        await service.prepare("default", {"model": MODEL, "input": "x", "previous_response_id": "resp_missing"})
    assert (info.value.kind.http_status, info.value.param, info.value.code) == (
        400, "previous_response_id", "previous_response_not_found")


async def test_context_overflow_with_truncation_disabled_is_400(service):
    with pytest.raises(ApiError) as info:
        await service.prepare("default", {"model": MODEL, "input": "word " * 300})
    assert (info.value.kind.http_status, info.value.code) == (400, "context_length_exceeded")


async def test_truncation_auto_drops_the_oldest_items(service):
    items = [{"role": "user", "content": "old " * 300}, {"role": "user", "content": "recent question"}]
    prepared = await service.prepare("default", {"model": MODEL, "input": items, "truncation": "auto"})
    assert [m.content for m in service.engine.prompts[-1]] == ["recent question"]
    assert len(prepared.prompt) < 256


async def test_delete_removes_everything(service):
    response = await service.create("default", {"model": MODEL, "input": "hi"})
    assert await service.delete("default", response["id"]) == {"id": response["id"], "object": "response", "deleted": True}
    assert await service.events.read(response["id"]) == []
    assert await service.store.input_items(response["id"]) is None
    with pytest.raises(ApiError):
        await service.delete("default", response["id"])


async def test_list_input_items_pagination(service):
    response = await service.create("default", {"model": MODEL, "input": [{"role": "user", "content": str(i)} for i in range(5)]})
    ids = [item["id"] for item in (await service.store.input_items(response["id"]))]
    page = await service.list_input_items("default", response["id"], limit=2, order="asc", after=None, before=None, include=[])
    assert [i["id"] for i in page["data"]] == ids[:2] and page["has_more"]
    assert page["first_id"] == ids[0] and page["last_id"] == ids[1]
    page = await service.list_input_items("default", response["id"], limit=2, order="asc", after=ids[1], before=None, include=[])
    assert [i["id"] for i in page["data"]] == ids[2:4]
    page = await service.list_input_items("default", response["id"], limit=None, order=None, after=None, before=None, include=[])
    assert [i["id"] for i in page["data"]] == ids[::-1] and not page["has_more"]
    page = await service.list_input_items("default", response["id"], limit=10, order="desc", after=None, before=ids[2], include=[])
    assert [i["id"] for i in page["data"]] == [ids[4], ids[3]]
    for bad in ({"limit": 0}, {"limit": 101}, {"order": "up"}):
        args = {"limit": None, "order": None, "after": None, "before": None, "include": [], **bad}
        with pytest.raises(ApiError):
            await service.list_input_items("default", response["id"], **args)


async def test_concurrent_streams_keep_their_own_sequences(service):
    results = await asyncio.gather(*(stream(service, input=f"q{i}") for i in range(5)))
    for events in results:
        check_stream(events)
    assert len({events[0]["response"]["id"] for events in results}) == 5


async def test_prompt_text_reaches_logs_only_when_asked(service, tmp_path, capsys):
    from parley import log

    log.configure("json", "debug")
    try:
        await service.create("default", {"model": MODEL, "input": "secret-prompt-text"})
        assert "secret-prompt-text" not in capsys.readouterr().err
        async with service_on(tmp_path / "logged.sqlite3", service.engine, log_prompts=True) as logging_service:
            await logging_service.create("default", {"model": MODEL, "input": "secret-prompt-text"})
        assert "secret-prompt-text" in capsys.readouterr().err
    finally:
        log.configure("console", "warning")
