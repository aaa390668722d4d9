"""WebSocket mode through the real Envoy, on the scripted engine: turns, continuation, lanes,
errors, limits and the handshake. Every event is checked against both specs (tests/support)."""

import asyncio

import httpx
import openai
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.stack import SCRIPTED_MODEL as MODEL
from tests.support.stack import scripted_stack
from tests.support.streams import check_stream, event_types, text_message_sequence
from tests.support.websocket import open_socket

pytestmark = pytest.mark.integration

KEY = "sk-bootstrap-0123456789"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory):
    async with scripted_stack(tmp_path_factory, "websocket", websocket_max_message_bytes=64 * 1024) as running:
        yield running


@pytest.fixture(autouse=True)
def engine(stack):
    engine = stack.engine
    script = engine.script
    yield engine
    engine.delay, engine.upcoming, engine.script = 0.0, [], script  # what a test steered, undone


def texts(messages) -> list[str]:
    """The text of each prompt message the engine saw."""
    return [message.content for message in messages]


async def test_turns_on_one_socket_stream_exactly_as_sse_does(stack, engine):
    async with open_socket(stack.base_url) as socket:
        first = await socket.turn(model=MODEL, input="hi")
        assert event_types(first) == text_message_sequence(2)
        response = check_stream(first)
        assert "stream_id" not in first[0]  # only a create that named a lane gets one back
        second = await socket.turn(model=MODEL, input="again", previous_response_id=response["id"])
        assert check_stream(second)["previous_response_id"] == response["id"]
    assert texts(engine.prompts[-1])[-3:] == ["hi", "Hello", "again"]
    # Stored as over HTTP: the chain is there for REST clients too.
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        stored = (await http.get(f"/responses/{second[-1]['response']['id']}")).json()
    assert stored["status"] == "completed" and stored["output"] == second[-1]["response"]["output"]


async def test_a_store_false_chain_lives_on_its_socket_only(stack, engine):
    async with open_socket(stack.base_url) as socket:
        first = check_stream(await socket.turn(model=MODEL, input="secret one", store=False))
        second = check_stream(await socket.turn(model=MODEL, input="secret two", store=False,
                                                previous_response_id=first["id"]))
    assert second["status"] == "completed" and second["store"] is False
    assert texts(engine.prompts[-1])[-3:] == ["secret one", "Hello", "secret two"]
    async with open_socket(stack.base_url) as socket:  # a new connection has no such state
        [refused] = await socket.turn(model=MODEL, input="three", previous_response_id=second["id"])
    assert refused["status"] == 400
    assert refused["error"]["code"] == "previous_response_not_found"
    assert refused["error"]["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as over_http:
        async with openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as client:
            await client.responses.create(model=MODEL, input="x", previous_response_id=second["id"])
    assert over_http.value.code == "previous_response_not_found"


async def test_a_stored_response_continues_on_a_new_socket(stack):
    async with open_socket(stack.base_url) as socket:
        first = check_stream(await socket.turn(model=MODEL, input="kept"))
    async with open_socket(stack.base_url) as socket:  # hydrated from the store
        assert check_stream(await socket.turn(model=MODEL, input="on", previous_response_id=first["id"]))[
            "status"] == "completed"


async def test_a_failed_continuation_evicts_the_id_it_named(stack):
    async with open_socket(stack.base_url) as socket:
        first = check_stream(await socket.turn(model=MODEL, input="one", store=False))
        [refused] = await socket.turn(model=MODEL, input="two", previous_response_id=first["id"], temperature=9)
        assert refused["status"] == 400 and refused["error"]["param"] == "temperature"
        [gone] = await socket.turn(model=MODEL, input="two", previous_response_id=first["id"])
    assert gone["error"]["code"] == "previous_response_not_found"


async def test_two_lanes_interleave_each_with_its_stream_id_and_a_lane_forks_from_another(stack, engine):
    engine.delay = 0.02
    engine.upcoming = [["a"] * 12, ["b"] * 12]
    async with open_socket(stack.base_url) as socket:
        await socket.send(model=MODEL, input="lane a", stream_id="agent_a")
        await socket.send(model=MODEL, input="lane b", stream_id="agent_b")
        lanes: dict[str, list[dict]] = {"agent_a": [], "agent_b": []}
        order = []
        while not all(events and events[-1]["type"] == "response.completed" for events in lanes.values()):
            event = await socket.next()
            lanes[event["stream_id"]].append(event)
            order.append(event["stream_id"])
        for events in lanes.values():
            assert event_types(events) == text_message_sequence(12)
            check_stream(events)
        # Concurrent, not one after the other: b started before a finished.
        assert order.index("agent_b") < len(order) - 1 - order[::-1].index("agent_a")
        a_id = lanes["agent_a"][-1]["response"]["id"]
        fork = await socket.turn(model=MODEL, input="fork", stream_id="agent_c", previous_response_id=a_id)
    assert {event["stream_id"] for event in fork} == {"agent_c"}
    assert check_stream(fork)["previous_response_id"] == a_id
    assert texts(engine.prompts[-1])[-3:] == ["lane a", "a" * 12, "fork"]


async def test_without_a_stream_id_a_second_create_waits_for_the_first(stack, engine):
    engine.delay = 0.02
    async with open_socket(stack.base_url) as socket:
        await socket.send(model=MODEL, input="first")
        await socket.send(model=MODEL, input="second")
        first = await socket.until_done()
        second = await socket.until_done()
    assert event_types(first) == event_types(second) == text_message_sequence(2)
    assert first[-1]["response"]["id"] != second[-1]["response"]["id"]


@pytest.mark.parametrize("message,param,code", [
    ("{not json", None, "invalid_json"),
    ('{"type": "response.cancel"}', "type", "unknown_event_type"),
    ('["response.create"]', "type", "invalid_type"),
    ('{"type": "response.create", "model": "scripted", "input": "x", "stream": false}', "stream",
     "unsupported_parameter"),
    ('{"type": "response.create", "model": "scripted", "input": "x", "background": true}', "background",
     "unsupported_parameter"),
    ('{"type": "response.create", "model": "scripted", "input": "x", "stream_options": {}}', "stream_options",
     "unsupported_parameter"),
    ('{"type": "response.create", "model": "scripted", "input": "x", "stream_id": "no spaces"}', "stream_id",
     "invalid_value"),
    ('{"type": "response.create", "model": "scripted", "input": "x", "nonsense": 1}', "nonsense", None),
])
async def test_a_bad_message_is_an_error_event_and_the_connection_goes_on(stack, message, param, code):
    async with open_socket(stack.base_url) as socket:
        await socket.send_raw(message)
        [error] = await socket.until_done()
        assert error["type"] == "error" and error["status"] == 400
        assert error["error"]["param"] == param and error["error"]["message"]
        if code is not None:
            assert error["error"]["code"] == code
        assert check_stream(await socket.turn(model=MODEL, input="still here"))["status"] == "completed"


async def test_stream_true_is_accepted_as_the_agents_sdk_sends_it(stack):
    async with open_socket(stack.base_url) as socket:
        assert check_stream(await socket.turn(model=MODEL, input="x", stream=True))["status"] == "completed"


async def test_a_message_over_the_limit_closes_with_1009(stack):
    async with open_socket(stack.base_url) as socket:
        await socket.send(model=MODEL, input="x" * (65 * 1024))
        with pytest.raises(ConnectionClosed) as closed:
            await socket.next()
    assert closed.value.rcvd.code == 1009


async def test_closing_the_socket_stops_generation(stack, engine):
    engine.delay = 0.02
    engine.upcoming = [["word "] * 2000]
    aborted, emitted = engine.aborted, engine.emitted_tokens
    async with open_socket(stack.base_url) as socket:
        await socket.send(model=MODEL, input="go on forever")
        response_id = (await socket.next())["response"]["id"]
        deltas = 0
        while deltas < 5:
            deltas += (await socket.next())["type"] == "response.output_text.delta"
    for _ in range(200):
        if engine.aborted > aborted:
            break
        await asyncio.sleep(0.02)
    assert engine.aborted == aborted + 1, "the generation was not stopped"
    stopped_at = engine.emitted_tokens
    await asyncio.sleep(0.2)
    assert engine.emitted_tokens == stopped_at and stopped_at - emitted < 2000
    assert (await stack.call(stack.app.service.get, "default", response_id))["status"] == "cancelled"


async def test_compacted_output_starts_a_new_chain_on_the_socket(stack, engine):
    async with openai.AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as client:
        raw = await client.responses.with_raw_response.compact(
            model=MODEL, input=[{"role": "user", "content": "The code word is heron."},
                                {"role": "assistant", "content": "Noted."}])
    window = orjson.loads(raw.content)["output"]
    async with open_socket(stack.base_url) as socket:
        events = await socket.turn(model=MODEL, input=[*window, {"role": "user", "content": "The word?"}])
    assert check_stream(events)["status"] == "completed"
    assert texts(engine.prompts[-1])[-1] == "The word?"


# -- a server with keys and a short connection life ---------------------------------------------

@pytest.fixture(scope="module")
async def limited(tmp_path_factory):
    async with scripted_stack(tmp_path_factory, "websocket-limited", api_key=KEY, websocket_max_seconds=2,
                              websocket_max_connections=2,
                              rate_limit_requests_per_minute=1000) as running:
        yield running


async def test_the_key_is_checked_before_the_upgrade(limited):
    with pytest.raises(InvalidStatus) as refused:
        async with open_socket(limited.base_url):
            pass
    assert refused.value.response.status_code == 401
    assert orjson.loads(refused.value.response.body)["error"]["type"] == "invalid_request_error"
    with pytest.raises(InvalidStatus) as refused:
        async with open_socket(limited.base_url, "sk-parley-wrong"):
            pass
    assert orjson.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
    async with open_socket(limited.base_url, KEY) as socket:
        assert check_stream(await socket.turn(model=MODEL, input="hi"))["status"] == "completed"


async def test_past_the_connection_limit_the_handshake_is_a_503(limited):
    async with open_socket(limited.base_url, KEY), open_socket(limited.base_url, KEY):
        with pytest.raises(InvalidStatus) as refused:
            async with open_socket(limited.base_url, KEY):
                pass
    assert refused.value.response.status_code == 503
    assert orjson.loads(refused.value.response.body)["error"]["code"] == "websocket_connections_exhausted"
    while limited.app.websocket.open_sessions:  # the server lets go of them just after the close
        await asyncio.sleep(0.02)
    async with open_socket(limited.base_url, KEY) as socket:  # a freed place is taken again
        assert check_stream(await socket.turn(model=MODEL, input="hi"))["status"] == "completed"


async def test_a_connection_ends_at_its_time_limit_with_the_specs_error(limited):
    async with open_socket(limited.base_url, KEY) as socket:
        assert check_stream(await socket.turn(model=MODEL, input="hi"))["status"] == "completed"
        [ending] = await socket.until_done(timeout=10)
        assert ending["error"]["code"] == "websocket_connection_limit_reached"
        with pytest.raises(ConnectionClosed) as closed:
            await socket.next()
    assert closed.value.rcvd.code == 1000


@pytest.mark.parametrize("path", ["/models", "/responses/resp_1", "/responses/"])
async def test_an_upgrade_anywhere_else_is_openais_404(stack, path):
    with pytest.raises(InvalidStatus) as refused:
        async with connect(stack.base_url.replace("http://", "ws://") + path):
            pass
    assert refused.value.response.status_code == 404
    error = orjson.loads(refused.value.response.body)["error"]
    assert error["message"] == f"Invalid URL (GET /v1{path}): WebSocket mode is served at GET /v1/responses."
