"""Sessions (WebSocket mode's semantics, transport aside) against the scripted engine: lanes,
the connection-local context, eviction, bounds, the time limit, and closing mid-turn."""

import asyncio

import pytest
from parley.service.sessions import SessionLimits

from tests.fakes.engines import ScriptedEngine
from tests.support.pipeline import service_on
from tests.support.streams import check_stream, event_types, text_message_sequence

MODEL = "scripted"


@pytest.fixture
async def service(tmp_path):
    engine = ScriptedEngine(model_id=MODEL, context_window=4096, script=["Hel", "lo"])
    async with service_on(tmp_path / "s.sqlite3", engine) as service:
        yield service


class Client:
    """One session, read like a socket: every event (or error envelope) in order."""

    def __init__(self, service, limits: SessionLimits | None = None):
        self.session = service.open_session("default", limits or SessionLimits())
        self.received: list[dict] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self):
        async for outgoing in self.session.outgoing():  # tagged as the WebSocket transport tags them
            tag = {} if outgoing.stream_id is None else {"stream_id": outgoing.stream_id}
            self.received.extend({**event, **tag} for event in outgoing.events)

    def send(self, **message):
        self.session.receive({"type": "response.create", "model": MODEL, **message})

    async def until(self, count_terminal: int, timeout: float = 5.0) -> list[dict]:
        """Wait until `count_terminal` responses ended or errors arrived; return what came."""
        async def done():
            while sum(e["type"] in ("response.completed", "response.incomplete", "response.failed", "error")
                      for e in self.received) < count_terminal:
                await asyncio.sleep(0.005)
        await asyncio.wait_for(done(), timeout)
        return self.received

    async def close(self):
        await self.session.close()
        await asyncio.wait_for(self._reader, 2)


@pytest.fixture
async def client(service):
    client = Client(service)
    yield client
    await client.close()


def responses(events: list[dict], stream_id=None) -> list[list[dict]]:
    """The events of each response (in the order they started), on one lane."""
    by_id: dict[str, list[dict]] = {}
    current = None
    for event in events:
        if event.get("stream_id") != stream_id or event["type"] == "error":
            continue
        if "response" in event:
            current = event["response"]["id"]
        by_id.setdefault(current, []).append(event)
    return list(by_id.values())


async def test_a_turn_streams_the_same_events_as_sse(client):
    client.send(input="hi")
    events = await client.until(1)
    assert event_types(events) == text_message_sequence(2)
    assert check_stream(events)["output"][0]["content"][0]["text"] == "Hello"
    assert all("stream_id" not in event for event in events)


async def test_store_false_chain_continues_from_the_connection_alone(client, service):
    client.send(input="My name is Ada.", store=False)
    [first] = responses(await client.until(1))
    first_id = first[-1]["response"]["id"]
    assert await service.store.get(first_id) is None  # nothing was stored
    client.send(input="And my name?", store=False, previous_response_id=first_id)
    [_, second] = responses(await client.until(2))
    assert second[-1]["type"] == "response.completed"
    prompt = service.engine.prompts[-1]
    assert [m.content for m in prompt if m.role == "user"] == ["My name is Ada.", "And my name?"]
    assert any(m.role == "assistant" and m.content == "Hello" for m in prompt)


async def test_a_continuation_reads_no_store_when_the_connection_holds_it(client, service):
    client.send(input="one")
    [first] = responses(await client.until(1))
    reads = []
    original = service.store.chain_context
    service.store.chain_context = lambda *a: reads.append(a) or original(*a)
    client.send(input="two", previous_response_id=first[-1]["response"]["id"])
    await client.until(2)
    assert reads == []


async def test_a_deleted_response_is_not_continued_from_the_connections_memory(client, service):
    client.send(input="one")
    [first] = responses(await client.until(1))
    first_id = first[-1]["response"]["id"]
    await service.delete("default", first_id)  # over HTTP, say, while the socket holds it
    client.send(input="two", previous_response_id=first_id)
    error = (await client.until(2))[-1]
    assert error["type"] == "error" and error["error"]["code"] == "previous_response_not_found"


async def test_the_context_equals_what_the_store_would_give(service):
    """The same chain through a session and over HTTP's path renders the same prompt."""
    client = Client(service)
    client.send(input="one", instructions="Be brief.")
    [first] = responses(await client.until(1))
    client.send(input=[{"role": "user", "content": [{"type": "input_text", "text": "two"}]}],
                previous_response_id=first[-1]["response"]["id"], instructions="Be brief.")
    [_, second] = responses(await client.until(2))
    session_prompt = service.engine.prompts[-1]
    await client.close()
    await service.drain()
    prepared = await service.prepare("default", {"model": MODEL, "input": "two", "instructions": "Be brief.",
                                                 "previous_response_id": first[-1]["response"]["id"]})
    prepared.ticket.release()
    assert service.engine.prompts[-1] == session_prompt
    assert second[-1]["response"]["usage"]["input_tokens"] == len(prepared.prompt)


async def test_stored_ids_hydrate_from_the_store_on_a_new_connection(service):
    first = Client(service)
    first.send(input="one")
    [response] = responses(await first.until(1))
    await first.close()
    await service.drain()
    second = Client(service)
    second.send(input="two", previous_response_id=response[-1]["response"]["id"])
    [events] = responses(await second.until(1))
    assert events[-1]["type"] == "response.completed"
    await second.close()


async def test_reconnect_loses_a_store_false_response(service):
    first = Client(service)
    first.send(input="one", store=False)
    [response] = responses(await first.until(1))
    await first.close()
    second = Client(service)
    second.send(input="two", store=False, previous_response_id=response[-1]["response"]["id"])
    [error] = await second.until(1)
    assert error["type"] == "error" and error["status"] == 400
    assert error["error"]["code"] == "previous_response_not_found"
    assert error["error"]["param"] == "previous_response_id"
    await second.close()


async def test_a_failed_continuation_evicts_the_id_it_named(client, service):
    client.send(input="one", store=False)
    [first] = responses(await client.until(1))
    first_id = first[-1]["response"]["id"]
    client.send(input="two", store=False, previous_response_id=first_id, temperature=9)  # a 400
    events = await client.until(2)
    assert events[-1]["type"] == "error" and events[-1]["error"]["param"] == "temperature"
    client.send(input="three", store=False, previous_response_id=first_id)
    events = await client.until(3)
    assert events[-1]["error"]["code"] == "previous_response_not_found"


async def test_a_response_that_failed_mid_stream_evicts_too(client, service):
    client.send(input="one", store=False)
    [first] = responses(await client.until(1))
    service.engine.fail_after = 1
    client.send(input="two", store=False, previous_response_id=first[-1]["response"]["id"])
    events = await client.until(2)
    assert events[-1]["type"] == "response.failed"
    service.engine.fail_after = None
    client.send(input="three", store=False, previous_response_id=first[-1]["response"]["id"])
    events = await client.until(3)
    assert events[-1]["error"]["code"] == "previous_response_not_found"


async def test_without_stream_id_turns_wait_their_turn(client, service):
    service.engine.delay = 0.01
    client.send(input="one")
    client.send(input="two")
    events = await client.until(2)
    [first, second] = responses(events)
    # the second started only after the first ended: no interleaving
    assert events.index(second[0]) > events.index(first[-1])
    check_stream(first)
    check_stream(second)


async def test_lanes_run_at_once_and_tag_every_event(client, service):
    service.engine.delay = 0.01
    client.send(input="one", stream_id="a")
    client.send(input="two", stream_id="b")
    events = await client.until(2)
    a, b = responses(events, "a"), responses(events, "b")
    assert len(a) == len(b) == 1
    check_stream(a[0])
    check_stream(b[0])
    order = [event.get("stream_id") for event in events]
    assert order.index("b") < len(order) - order[::-1].index("a") - 1, "the lanes did not interleave"
    assert set(order) == {"a", "b"}


async def test_a_new_lane_forks_from_another_lanes_response(client, service):
    client.send(input="root", stream_id="a", store=False)
    [root] = responses(await client.until(1), "a")
    root_id = root[-1]["response"]["id"]
    client.send(input="left", stream_id="a", store=False, previous_response_id=root_id)
    client.send(input="right", stream_id="b", store=False, previous_response_id=root_id)
    events = await client.until(3)
    assert [r[-1]["type"] for r in responses(events, "a")] == ["response.completed"] * 2
    assert responses(events, "b")[0][-1]["type"] == "response.completed"


async def test_a_bad_stream_id_and_unknown_types_are_errors_and_the_session_goes_on(client):
    client.session.receive({"type": "response.create", "stream_id": "no spaces", "input": "x"})
    client.session.receive({"type": "response.steer", "input": "x"})
    client.session.receive(["not", "an", "object"])
    client.send(input="still here")
    events = await client.until(4)
    errors = [e for e in events if e["type"] == "error"]
    assert [e["error"]["param"] for e in errors] == ["stream_id", "type", "type"]
    assert all(e["status"] == 400 and e["error"]["type"] == "invalid_request_error" for e in errors)
    assert events[-1]["type"] == "response.completed"


@pytest.mark.parametrize(("field", "value"), [("stream", False), ("stream_options", {}), ("background", True),
                                              ("generate", "no")])
async def test_transport_fields_are_refused_by_name(client, field, value):
    client.send(input="x", **{field: value})
    [error] = await client.until(1)
    assert error["type"] == "error" and error["error"]["param"] == field


async def test_stream_true_is_what_the_transport_does_anyway(client):
    client.send(input="x", stream=True, background=False)  # what the Agents SDK sends
    events = await client.until(1)
    assert events[-1]["type"] == "response.completed"


async def test_generate_false_prepares_state_to_continue_from(client, service):
    client.send(input="Remember: blue.", generate=False, store=False)
    [warm] = responses(await client.until(1))
    assert event_types(warm) == ["response.created", "response.in_progress", "response.completed"]
    assert warm[-1]["response"]["output"] == [] and warm[-1]["response"]["usage"]["output_tokens"] == 0
    generated = service.engine.emitted_tokens
    client.send(input="Which colour?", store=False, previous_response_id=warm[-1]["response"]["id"])
    events = await client.until(2)
    assert events[-1]["type"] == "response.completed" and service.engine.emitted_tokens == generated + 2
    assert [m.content for m in service.engine.prompts[-1] if m.role == "user"] == ["Remember: blue.", "Which colour?"]


async def test_the_stream_limit_bounds_lanes(service):
    service.engine.delay = 0.05
    client = Client(service, SessionLimits(max_lanes=2))
    for lane in ("a", "b", "c"):
        client.send(input="x", stream_id=lane)
    events = await client.until(3)
    [error] = [e for e in events if e["type"] == "error"]
    assert error["error"]["code"] == "websocket_stream_limit_reached" and error["stream_id"] == "c"
    await client.close()


async def test_waiting_creates_are_bounded(service):
    service.engine.delay = 0.05
    client = Client(service, SessionLimits(max_pending=1))
    client.send(input="runs")
    await asyncio.sleep(0.01)  # it started: it no longer waits
    client.send(input="waits")
    client.send(input="refused")
    events = await client.until(3)
    [error] = [e for e in events if e["type"] == "error"]
    assert error["error"]["code"] == "websocket_queue_full" and error["status"] == 429
    await client.close()


async def test_the_time_limit_ends_the_session_after_the_running_turn(service):
    service.engine.delay = 0.1
    client = Client(service, SessionLimits(max_seconds=0.05))
    client.send(input="runs to its end")
    client.send(input="never starts")
    await asyncio.wait_for(client._reader, 5)  # the session ended by itself
    events = client.received
    [finished] = responses(events)
    assert finished[-1]["type"] == "response.completed"
    codes = [e["error"]["code"] for e in events if e["type"] == "error"]
    assert codes == ["websocket_connection_limit_reached"] * 2  # the refused create, then the last word
    assert client.session.end_reason == "websocket_connection_limit_reached"
    client.send(input="after the end")
    await client.session.close()


async def test_closing_mid_turn_stops_generation_and_cancels_the_stored_response(service):
    service.engine.script = ["w"] * 200
    service.engine.delay = 0.01
    client = Client(service)
    client.send(input="long")
    while sum(e["type"] == "response.output_text.delta" for e in client.received) < 3:
        await asyncio.sleep(0.005)
    response_id = client.received[0]["response"]["id"]
    await client.close()
    emitted = service.engine.emitted_tokens
    await asyncio.sleep(0.1)
    assert service.engine.emitted_tokens == emitted and service.engine.aborted == 1
    await service.drain()
    assert (await service.store.get(response_id))["status"] == "cancelled"


async def test_a_client_that_reads_nothing_is_dropped(service):
    service.engine.script = ["w"] * 50
    session = service.open_session("default", SessionLimits(outbox_batches=2, slow_reader_seconds=0.05))
    session.receive({"type": "response.create", "model": MODEL, "input": "x"})
    for _ in range(200):
        if session.ended:
            break
        await asyncio.sleep(0.01)
    assert session.ended and session.end_reason == "slow reader"
    await session.close()
    assert service.engine.aborted == 1
