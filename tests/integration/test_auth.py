"""API keys and projects through Envoy with the official SDK and the typed gRPC API: 401s in
OpenAI's shape, and one project never sees or touches another's responses by any route."""

import asyncio

import grpc
import httpx
import openai
import pytest
from parley.service.keys import create_key
from parley.v1 import service_pb2, service_pb2_grpc

from tests.support.stack import scripted_stack

pytestmark = pytest.mark.integration

MODEL = "scripted"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory):
    async with scripted_stack(tmp_path_factory, "auth", api_key="sk-bootstrap-0123456789",
                              rate_limit_requests_per_minute=1000) as running:
        running.keys = {}
        for project in ("alpha", "beta"):
            running.keys[project], _ = await running.call(create_key, running.app.store, project)
        yield running


def client(stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0)


async def test_a_missing_or_wrong_key_is_a_401_the_sdk_knows(stack):
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{stack.base_url}/responses", json={"model": MODEL, "input": "hi"})
    assert reply.status_code == 401
    assert reply.json()["error"] == {
        "message": "You didn't provide an API key. You need to provide your API key in an Authorization header "
                   "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        "type": "invalid_request_error", "param": None, "code": None}
    with pytest.raises(openai.AuthenticationError) as refused:
        await client(stack, "sk-parley-not-a-key").responses.create(model=MODEL, input="hi")
    assert refused.value.code == "invalid_api_key" and "not-a-key" not in str(refused.value)


async def test_the_bootstrap_key_works_as_the_default_project(stack):
    response = await client(stack, "sk-bootstrap-0123456789").responses.create(model=MODEL, input="hi")
    assert response.output_text == "Hello"


async def test_a_revoked_key_is_refused(stack):
    key, record = await stack.call(create_key, stack.app.store, "gamma")
    assert (await client(stack, key).responses.create(model=MODEL, input="hi")).status == "completed"
    await stack.call(stack.app.store.revoke_key, record.id)
    stack.app.authenticator.forget()  # the cache would let it work for up to 10 s more
    with pytest.raises(openai.AuthenticationError):
        await client(stack, key).responses.create(model=MODEL, input="hi")


async def test_another_projects_response_is_not_found_by_any_route(stack):
    alpha, beta = client(stack, stack.keys["alpha"]), client(stack, stack.keys["beta"])
    own = await alpha.responses.create(model=MODEL, input="secret", background=True)
    while (await alpha.responses.retrieve(own.id)).status in ("queued", "in_progress"):
        await asyncio.sleep(0.05)
    attempts = [
        beta.responses.retrieve(own.id),
        beta.responses.input_items.list(own.id),
        beta.responses.cancel(own.id),
        beta.responses.delete(own.id),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError):
            await attempt
    # A continuation names the missing id the way OpenAI does: 400, previous_response_not_found.
    with pytest.raises(openai.BadRequestError) as refused:
        await beta.responses.create(model=MODEL, input="go on", previous_response_id=own.id)
    assert refused.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        async for _ in await beta.responses.retrieve(own.id, stream=True):
            pass
    # The typed API checks the same key, from `authorization` metadata.
    async with stack.channel() as channel:
        stub = service_pb2_grpc.ResponsesStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetResponse(service_pb2.GetResponseRequest(response_id=own.id),
                                   metadata=(("authorization", f"Bearer {stack.keys['beta']}"),))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetResponse(service_pb2.GetResponseRequest(response_id=own.id))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        found = await stub.GetResponse(service_pb2.GetResponseRequest(response_id=own.id),
                                       metadata=(("authorization", f"Bearer {stack.keys['alpha']}"),))
        assert found.id == own.id
    assert (await alpha.responses.retrieve(own.id)).id == own.id  # untouched by beta's attempts


async def test_every_reply_carries_the_rate_limit_headers(stack):
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {stack.keys['alpha']}"}) as http:
        created = await http.post(f"{stack.base_url}/responses", json={"model": MODEL, "input": "hi"})
        missing = await http.get(f"{stack.base_url}/responses/resp_nope")
    for reply in (created, missing):
        assert reply.headers["x-ratelimit-limit-requests"] == "1000"
        assert int(reply.headers["x-ratelimit-remaining-requests"]) < 1000
        assert reply.headers["x-ratelimit-reset-requests"].endswith("s")
