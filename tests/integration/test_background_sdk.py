"""Background mode, cancel and resumable streams through Envoy with the SDK, on both stores."""

import asyncio
import contextlib

import openai
import pytest
from openai import AsyncOpenAI

from tests.fakes.engines import ScriptedEngine
from tests.support import postgres
from tests.support.stack import running_stack
from tests.support.streams import check_stream

pytestmark = pytest.mark.integration

MODEL = "scripted"
TOKENS = 60


@contextlib.asynccontextmanager
async def store_settings(kind, tmp_path):
    if kind == "sqlite":
        yield {"store_path": str(tmp_path / "bg.sqlite3")}
    else:
        with postgres.fresh_schema() as dsn:
            yield {"store_dsn": dsn, "store_path": str(tmp_path / "unused.sqlite3")}


@pytest.fixture(params=["sqlite", "postgres"], scope="module")
async def env(request, tmp_path_factory):
    engine = ScriptedEngine(model_id=MODEL, script=["tok "] * TOKENS, delay=0.02)
    async with store_settings(request.param, tmp_path_factory.mktemp(request.param)) as settings:
        path = settings.pop("store_path")
        async with running_stack(path, engine=engine, model_name=MODEL, max_concurrent_generations=2,
                                 max_queued_generations=1, **settings) as stack:
            async with AsyncOpenAI(base_url=stack.base_url, api_key="x", max_retries=0) as client:
                yield stack, client


async def finished(client, response_id, timeout=20):
    """The stored response once it has ended, found by following its event stream to the end."""
    async with asyncio.timeout(timeout):
        async for _event in await client.responses.retrieve(response_id, stream=True):
            pass
    response = await client.responses.retrieve(response_id)
    assert response.status not in ("queued", "in_progress")
    return response


async def test_background_create_returns_queued_then_completes(env):
    stack, client = env
    queued = await client.responses.create(model=MODEL, input="go", background=True)
    assert queued.status == "queued" and queued.background is True
    done = await finished(client, queued.id)
    assert done.status == "completed" and done.output_text == "tok " * TOKENS


async def test_background_stream_can_be_dropped_without_stopping_generation(env):
    stack, client = env
    stream = await client.responses.create(model=MODEL, input="go", background=True, stream=True)
    response_id = None
    async for event in stream:
        response_id = response_id or event.response.id
        if event.type == "response.output_text.delta":
            break
    await stream.close()
    assert (await finished(client, response_id)).usage.output_tokens == TOKENS


async def test_resume_from_a_sequence_number_then_follow_live(env):
    stack, client = env
    queued = await client.responses.create(model=MODEL, input="go", background=True)
    await asyncio.sleep(0.2)
    events = [e.model_dump(mode="json", exclude_unset=True)
              async for e in await client.responses.retrieve(queued.id, stream=True, starting_after=3)]
    assert [e["sequence_number"] for e in events] == list(range(4, 4 + len(events)))
    assert events[-1]["type"] == "response.completed"
    everything = [e.model_dump(mode="json", exclude_unset=True)
                  async for e in await client.responses.retrieve(queued.id, stream=True)]
    assert check_stream(everything)["output"][0]["content"][0]["text"] == "tok " * TOKENS


async def test_cancel_stops_tokens_and_is_idempotent(env):
    stack, client = env
    queued = await client.responses.create(model=MODEL, input="go", background=True)
    async for event in await client.responses.retrieve(queued.id, stream=True):
        if event.type == "response.output_text.delta":
            break  # generation is under way
    cancelled = await client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    emitted = stack.engine.emitted_tokens
    await asyncio.sleep(0.3)
    assert stack.engine.emitted_tokens == emitted, "tokens kept coming after the cancel"
    assert (await client.responses.cancel(queued.id)).status == "cancelled"
    stored = await client.responses.retrieve(queued.id)
    assert stored.status == "cancelled" and 0 < len(stored.output_text) < len("tok " * TOKENS)


async def test_cancel_of_finished_or_foreground_responses(env):
    stack, client = env
    foreground = await client.responses.create(model=MODEL, input="go")
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(foreground.id)
    background = await client.responses.create(model=MODEL, input="go", background=True)
    await finished(client, background.id)
    with pytest.raises(openai.ConflictError) as info:
        await client.responses.cancel(background.id)
    assert info.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.NotFoundError):
        await client.responses.cancel("resp_nope")


async def test_beyond_capacity_is_429_with_retry_hint(env):
    stack, client = env
    running = [await client.responses.create(model=MODEL, input="go", background=True) for _ in range(3)]
    with pytest.raises(openai.RateLimitError) as info:
        await client.responses.create(model=MODEL, input="go", background=True)
    assert info.value.response.headers["x-should-retry"] == "true"
    assert info.value.body["type"] == "rate_limit_error"
    for response in running:
        await finished(client, response.id)


async def test_background_requires_store(env):
    stack, client = env
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=MODEL, input="go", background=True, store=False)
    assert info.value.body["param"] == "store"
