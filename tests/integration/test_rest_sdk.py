"""The REST surface through Envoy, driven by the official openai SDK, on the real model."""

import asyncio

import httpx
import openai
import orjson
import pytest

from tests.integration.conftest import BODY_LIMIT, MODEL
from tests.support.streams import check_stream, event_types, text_message_sequence

pytestmark = [pytest.mark.integration, pytest.mark.model]


async def test_create_echoes_every_field(client):
    response = await client.responses.create(
        model=MODEL, input="What is the capital of France?", instructions="Answer in one short sentence.",
        max_output_tokens=48, temperature=0, top_p=0.9, metadata={"team": "search", "run": "7"}, store=True,
        user="user-1", safety_identifier="sid-1", prompt_cache_key="pck-1", truncation="disabled",
        parallel_tool_calls=False, service_tier="flex", text={"verbosity": "low"}, reasoning={"summary": "auto"})
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.output_text.strip()
    assert response.model == MODEL and response.instructions == "Answer in one short sentence."
    assert (response.temperature, response.top_p, response.max_output_tokens) == (0, 0.9, 48)
    assert response.metadata == {"team": "search", "run": "7"}
    assert (response.user, response.safety_identifier, response.prompt_cache_key) == ("user-1", "sid-1", "pck-1")
    # The tier actually used (one serves everything), and no summary from a model that does not reason.
    assert (response.truncation, response.parallel_tool_calls, response.service_tier) == ("disabled", False, "default")
    assert response.text.verbosity == "low" and response.reasoning.summary is None
    assert response.usage.input_tokens > 10 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


async def test_list_input_with_every_role_and_content_form(client):
    response = await client.responses.create(model=MODEL, temperature=0, max_output_tokens=16, input=[
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "input_text", "text": "Reply with one word."}]},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": [{"type": "input_text", "text": "Another one?"}]},
    ])
    assert response.status in ("completed", "incomplete")
    items = await client.responses.input_items.list(response.id, order="asc")
    assert [item.role for item in items.data] == ["system", "developer", "user", "assistant", "user"]
    assert items.data[3].content[0].type == "output_text"


async def test_max_output_tokens_cut_off_is_incomplete(client):
    response = await client.responses.create(model=MODEL, input="Write a long story about a dragon.",
                                              max_output_tokens=16, temperature=0)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 16


async def test_stream_event_sequence_matches_the_final_object(client):
    stream = await client.responses.create(model=MODEL, input="Count from one to five.", stream=True,
                                           max_output_tokens=32, temperature=0)
    events = [event.model_dump(mode="json", exclude_unset=True) async for event in stream]
    deltas = sum(1 for e in events if e["type"] == "response.output_text.delta")
    closing = events[-1]["type"]
    assert event_types(events) == text_message_sequence(deltas, closing)
    response = check_stream(events)
    assert (await client.responses.retrieve(response["id"])).output_text == response["output"][0]["content"][0]["text"]


async def test_stream_helper(client):
    async with client.responses.stream(model=MODEL, input="Say hi.", max_output_tokens=256, temperature=0) as stream:
        text = "".join([event.delta async for event in stream if event.type == "response.output_text.delta"])
        final = await stream.get_final_response()
    assert final.output_text == text and text


async def test_raw_sse_framing(stack):
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", f"{stack.base_url}/responses", json={
                "model": MODEL, "input": "Hi", "stream": True, "max_output_tokens": 16, "temperature": 0}) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            raw = b"".join([chunk async for chunk in reply.aiter_bytes()])
    frames = [f for f in raw.split(b"\n\n") if f]
    assert frames[-1] == b"data: [DONE]" and raw.endswith(b"\n\n")  # the Open Responses terminal frame
    frames = frames[:-1]
    for frame in frames:
        event_line, data_line = frame.split(b"\n")
        event = orjson.loads(data_line.removeprefix(b"data: "))
        assert event_line == b"event: " + event["type"].encode()
    assert orjson.loads(frames[-1].split(b"\n")[1][6:])["type"] in ("response.completed", "response.incomplete")


async def test_previous_response_id_continues_and_reuses_the_prompt_cache(client):
    first = await client.responses.create(model=MODEL, input="My name is Ada. Remember it.",
                                          instructions="Be brief.", max_output_tokens=24, temperature=0)
    second = await client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                           max_output_tokens=24, temperature=0)
    assert second.previous_response_id == first.id
    assert second.instructions is None
    assert second.usage.input_tokens > first.usage.input_tokens  # the earlier turn is in the prompt
    items = await client.responses.input_items.list(second.id)
    assert [item.content[0].text for item in items.data] == ["What is my name?"]


async def test_retrieve_delete_and_store_false(client):
    created = await client.responses.create(model=MODEL, input="Hello", max_output_tokens=16, temperature=0)
    fetched = await client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(created.id)
    ephemeral = await client.responses.create(model=MODEL, input="Hello", max_output_tokens=16, store=False)
    assert ephemeral.output_text is not None
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.retrieve(ephemeral.id)
    assert info.value.body["param"] == "response_id"


async def test_input_items_pagination_and_include(client):
    response = await client.responses.create(model=MODEL, max_output_tokens=16, temperature=0,
                                             input=[{"role": "user", "content": f"item {i}"} for i in range(5)])
    everything = await client.responses.input_items.list(response.id, order="asc")
    ids = [item.id for item in everything.data]
    assert len(ids) == 5 and not everything.has_more
    page = await client.responses.input_items.list(response.id, limit=2, order="asc", after=ids[0],
                                                   include=["message.input_image.image_url"])
    assert [item.id for item in page.data] == ids[1:3] and page.has_more
    page = await client.responses.input_items.list(response.id, limit=10, order="desc",
                                                   extra_query={"before": ids[2]})
    assert [item.id for item in page.data] == [ids[4], ids[3]]
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.input_items.list(response.id, include=["bogus.value"])
    assert info.value.body["param"] == "include[0]"


async def test_models_list(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "parley"


BAD_REQUESTS = [
    ({"model": "no-such-model", "input": "x"}, openai.NotFoundError, "model"),
    ({"model": MODEL, "input": 42}, openai.BadRequestError, "input"),
    ({"model": MODEL, "input": "x", "previous_response_id": "resp_doesnotexist"}, openai.BadRequestError,
     "previous_response_id"),
    ({"model": MODEL, "input": "x", "temperature": 2.1}, openai.BadRequestError, "temperature"),
    ({"model": MODEL, "input": "x", "top_p": 1.1}, openai.BadRequestError, "top_p"),
    ({"model": MODEL, "input": "x", "max_output_tokens": 15}, openai.BadRequestError, "max_output_tokens"),
    ({"model": MODEL, "input": "x", "top_logprobs": 21}, openai.BadRequestError, "top_logprobs"),
    ({"model": MODEL, "input": "x", "metadata": {str(i): "v" for i in range(17)}}, openai.BadRequestError,
     "metadata"),
    ({"model": MODEL, "input": "x", "metadata": {"k" * 65: "v"}}, openai.BadRequestError, "metadata"),
    ({"model": MODEL, "input": "x", "metadata": {"k": "v" * 513}}, openai.BadRequestError, "metadata.k"),
    ({"model": MODEL, "input": "x", "include": ["everything"]}, openai.BadRequestError, "include[0]"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]},
     openai.BadRequestError, "tools[0].type"),
]


@pytest.mark.parametrize("body,error,param", BAD_REQUESTS, ids=[b[2] for b in BAD_REQUESTS])
@pytest.mark.parametrize("stream", [False, True])
async def test_bad_requests_get_openai_errors(client, body, error, param, stream):
    with pytest.raises(error) as info:
        await client.responses.create(**body, stream=stream)
    assert info.value.body["param"] == param
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["message"]
    assert set(info.value.body) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("payload,content_type", [
    (b"{not json", "application/json"),
    (b"[1, 2, 3]", "application/json"),
    (b"", "application/json"),
])
async def test_malformed_bodies(stack, payload, content_type):
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{stack.base_url}/responses", content=payload, headers={"content-type": content_type})
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] in ("invalid_json", "invalid_body")


async def test_body_over_the_limit_is_413(stack):
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{stack.base_url}/responses",
                                json={"model": MODEL, "input": "x" * (BODY_LIMIT + 1024)})
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


async def test_unknown_route_and_health(stack):
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{stack.base_url}/nothing-here")
        assert reply.status_code == 404 and reply.json()["error"]["type"] == "invalid_request_error"
        # The server runs on its own loop, so Envoy's health checks are answered whatever the
        # tests before did.
        health = await http.get(stack.base_url.removesuffix("/v1") + "/healthz")
        assert health.status_code == 200


async def test_cancel_of_a_foreground_response_is_a_clear_400(client):
    created = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=16)
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.cancel(created.id)
    assert "background" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        await client.responses.cancel("resp_missing")


ESSAY = "Write a very long essay about the history of computing."


async def test_disconnect_stops_generation_within_two_tokens(stack):
    engine = stack.engine
    run = None
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", f"{stack.base_url}/responses", json={
                "model": MODEL, "input": ESSAY,
                "stream": True, "max_output_tokens": 2000, "temperature": 0}) as reply:
            deltas = 0
            response_id = None
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    event = orjson.loads(line[6:])
                    response_id = response_id or event.get("response", {}).get("id")
                    deltas += event["type"] == "response.output_text.delta"
                    run = run or (engine.run_with(ESSAY) if deltas else None)  # this request's, while it runs
                    if deltas == 5:
                        break
    # The abort reaches the engine thread asynchronously: wait for the sequence to leave the batch.
    assert await asyncio.to_thread(run.released.wait, 30), "the sequence never left the batch"
    stored = await stack.call(stack.app.service.get, "default", response_id)
    assert run.produced_when_stopped is not None, f"generation was not stopped ({run}, stored {stored['status']})"
    assert run.produced - run.produced_when_stopped <= 2
    assert run.produced < 2000
    assert stored["status"] == "cancelled"


async def test_background_cancel_stops_the_real_model(stack, client):
    engine = stack.engine
    queued = await client.responses.create(model=MODEL, input="Write a very long essay about the sea.",
                                           background=True, max_output_tokens=2000, temperature=0)
    deltas = 0
    async for event in await client.responses.retrieve(queued.id, stream=True):
        deltas += event.type == "response.output_text.delta"
        if deltas == 5:  # this response's own tokens are flowing
            break
    cancelled = await client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    run = engine.run_with("essay about the sea")
    assert await asyncio.to_thread(run.released.wait, 30), "the sequence never left the batch"
    assert run.produced_when_stopped is not None
    assert run.produced - run.produced_when_stopped <= 2
    assert run.produced < 2000
    stored = await client.responses.retrieve(queued.id)
    assert stored.status == "cancelled" and stored.output_text
