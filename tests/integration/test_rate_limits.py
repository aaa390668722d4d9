"""Per-project rate limits through Envoy: 429 `rate_limit_exceeded` with OpenAI's headers, and the
official SDK's retry lands once the bucket has refilled."""

import asyncio
import time

import httpx
import openai
import pytest
from parley.service.keys import create_key

from tests.support.stack import scripted_stack

pytestmark = pytest.mark.integration

MODEL = "scripted"
PER_MINUTE = 30  # one comes back every 2 s


@pytest.fixture(scope="module")
async def stack(tmp_path_factory):
    async with scripted_stack(tmp_path_factory, "limits", rate_limit_requests_per_minute=PER_MINUTE) as running:
        running.keys = {}
        for project in ("busy", "quiet"):
            running.keys[project], _ = await running.call(create_key, running.app.store, project)
        running.app.authenticator.forget()  # auth was off until now: no key existed
        yield running


async def test_the_request_over_the_limit_is_a_429_with_headers_and_the_sdk_retry_succeeds(stack):
    headers = {"authorization": f"Bearer {stack.keys['busy']}"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        async def create():
            return await http.post(f"{stack.base_url}/responses", json={"model": MODEL, "input": "hi"})

        refused = []
        for _ in range(2 * PER_MINUTE // 20):  # in batches that the generation queue takes whole
            replies = await asyncio.gather(*(create() for _ in range(20)))
            assert all(reply.status_code in (200, 429) for reply in replies)
            refused = [reply for reply in replies if reply.status_code == 429]
            if refused:
                break
    assert refused
    reply = refused[0]
    error = reply.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    assert "requests per min (RPM) in project busy" in error["message"]
    assert reply.headers["x-ratelimit-limit-requests"] == str(PER_MINUTE)
    assert reply.headers["x-ratelimit-remaining-requests"] == "0"
    assert reply.headers["x-should-retry"] == "true" and int(reply.headers["retry-after-ms"]) <= 60_000 / PER_MINUTE
    # Another project is untouched by this one's limit.
    quiet = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.keys["quiet"], max_retries=0)
    assert (await quiet.responses.create(model=MODEL, input="hi")).status == "completed"
    # The SDK waits as told and its retry gets through.
    busy = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.keys["busy"], max_retries=3)
    async with httpx.AsyncClient(headers=headers) as http:
        while True:  # use up what came back meanwhile, so that the SDK's first try is refused
            reply = await http.post(f"{stack.base_url}/responses", json={"model": MODEL, "input": "hi"})
            if reply.status_code == 429:
                next_one_at = time.monotonic() + int(reply.headers["retry-after-ms"]) / 1000
                break
    started = time.monotonic()
    raw = await busy.responses.with_raw_response.create(model=MODEL, input="hi")
    assert raw.parse().status == "completed"
    if started < next_one_at - 0.2:  # a slow machine may have waited out the refill already
        assert raw.retries_taken >= 1
