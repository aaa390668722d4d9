"""Real processes: SIGKILL mid-generation, SIGTERM draining, two replicas on one PostgreSQL."""

import asyncio
import contextlib
import sqlite3

import grpc
import httpx
import pytest
from openai import AsyncOpenAI
from parley.codec import typed
from parley.v1 import responses_pb2, service_pb2, service_pb2_grpc

from tests.support import postgres
from tests.support.processes import ServerProcess
from tests.support.stack import envoy_over, free_port

pytestmark = pytest.mark.integration

MODEL = "scripted"
FAST_LEASES = {"lease_seconds": 2, "maintenance_interval_seconds": 1}


async def wait_status(client, response_id, statuses, timeout=30):
    for _ in range(int(timeout / 0.1)):
        with contextlib.suppress(Exception):
            response = await client.responses.retrieve(response_id)
            if response.status in statuses:
                return response
        await asyncio.sleep(0.1)
    raise AssertionError(f"{response_id} never reached {statuses}")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_sigkill_mid_generation_leaves_nothing_in_progress_forever(kind, tmp_path):
    with postgres.store_for(kind, tmp_path) as store:
        server = ServerProcess(**store, **FAST_LEASES, scripted_output_tokens=2000, scripted_token_delay_ms=10,
                               grpc_port=free_port()).start()
        port = server.port
        try:
            async with envoy_over(server.target) as envoy:
                async with AsyncOpenAI(base_url=envoy.url, api_key="x", max_retries=0) as client:
                    completed = await client.responses.create(model=MODEL, input="quick", max_output_tokens=16)
                    background = await client.responses.create(model=MODEL, input="long", background=True)
                    stream = await client.responses.create(model=MODEL, input="long", stream=True)
                    foreground_id = None
                    async for event in stream:
                        foreground_id = event.response.id
                        break
                    await wait_status(client, background.id, ("in_progress",))
                    server.kill()
                    await stream.close()
                    restarted = ServerProcess(**store, **FAST_LEASES, grpc_port=port).start()
                    try:
                        for response_id in (background.id, foreground_id):
                            failed = await wait_status(client, response_id, ("failed",))
                            assert "lease expired" in failed.error.message
                        intact = await client.responses.retrieve(completed.id)
                        assert intact.model_dump() == completed.model_dump()
                        events = [e async for e in await client.responses.retrieve(background.id, stream=True)]
                        assert events[-1].type == "response.failed"
                    finally:
                        restarted.stop()
        finally:
            server.stop()
        if kind == "sqlite":
            with sqlite3.connect(store["store_path"]) as db:
                assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def status_after_sigterm(path, grace_seconds, tokens, delay_ms) -> str:
    """Start a background response, SIGTERM the server mid-way, return the status it stored."""
    server = ServerProcess(store_path=path, shutdown_grace_seconds=grace_seconds, scripted_output_tokens=tokens,
                           scripted_token_delay_ms=delay_ms).start()
    try:
        async with envoy_over(server.target) as envoy:
            async with AsyncOpenAI(base_url=envoy.url, api_key="x", max_retries=0) as client:
                background = await client.responses.create(model=MODEL, input="go", background=True)
                await wait_status(client, background.id, ("in_progress",))
                assert await asyncio.to_thread(server.terminate) == 0
    finally:
        server.stop()
    # The process is gone: read the state it left.
    with sqlite3.connect(path) as db:
        return db.execute("SELECT status FROM responses WHERE id = ?", (background.id,)).fetchone()[0]


async def test_sigterm_drains_in_flight_work_within_the_grace(tmp_path):
    assert await status_after_sigterm(tmp_path / "drain.sqlite3", 10, 40, 25) == "completed"


async def test_sigterm_fails_work_that_outlives_the_grace(tmp_path):
    assert await status_after_sigterm(tmp_path / "late.sqlite3", 1, 1000, 20) == "failed"


async def test_two_replicas_on_one_postgres_behind_one_envoy(tmp_path):
    with postgres.fresh_schema() as dsn:
        settings = dict(store_dsn=dsn, scripted_output_tokens=400, scripted_token_delay_ms=10, **FAST_LEASES)
        first = ServerProcess(**settings, replica_id="replica-a").start()
        second = ServerProcess(**settings, replica_id="replica-b").start()
        try:
            async with grpc.aio.insecure_channel(first.target) as a, grpc.aio.insecure_channel(second.target) as b:
                on_a, on_b = service_pb2_grpc.ResponsesStub(a), service_pb2_grpc.ResponsesStub(b)
                request = typed.from_json({"model": MODEL, "input": "hello", "background": True},
                                          responses_pb2.CreateResponseRequest())
                created = await on_a.CreateResponse(request)                   # create on A
                fetched = await on_b.GetResponse(service_pb2.GetResponseRequest(response_id=created.id))
                assert fetched.id == created.id                                # retrieve on B
                items = await on_b.ListInputItems(service_pb2.ListInputItemsRequest(response_id=created.id))
                assert items.data[0].message.content.parts.items[0].input_text.text == "hello"  # list on B
                follow = on_b.FollowResponse(service_pb2.FollowResponseRequest(response_id=created.id,
                                                                            starting_after=2))
                seen = []
                async for event in follow:                                     # resume on B, live
                    seen.append(typed.to_json(event))
                    if len(seen) == 20:
                        break
                follow.cancel()
                assert [e["sequence_number"] for e in seen] == list(range(3, 23))
                cancelled = await on_b.CancelResponse(service_pb2.CancelResponseRequest(response_id=created.id))
                assert cancelled.status == "cancelled"                         # cancel on B stops A
                await asyncio.sleep(0.5)
                stored = await on_a.GetResponse(service_pb2.GetResponseRequest(response_id=created.id))
                assert stored.status == "cancelled"
                text = stored.output[0].message.content.output_parts.items[0].output_text.text
                assert 0 < len(text) < len("tok " * 400)
                await asyncio.sleep(0.5)
                again = await on_a.GetResponse(service_pb2.GetResponseRequest(response_id=created.id))
                assert again.output[0].message.content.output_parts.items[0].output_text.text == text

            async with envoy_over(first.target, second.target) as envoy:           # REST across both
                async with AsyncOpenAI(base_url=envoy.url, api_key="x", max_retries=0) as client:
                    background = await client.responses.create(model=MODEL, input="go", background=True)
                    statuses = {(await client.responses.retrieve(background.id)).status for _ in range(6)}
                    assert statuses <= {"queued", "in_progress", "completed"}
                    events = [e async for e in await client.responses.retrieve(background.id, stream=True)]
                    assert events[-1].type == "response.completed"
                    assert (await client.responses.cancel(
                        (await client.responses.create(model=MODEL, input="x", background=True)).id)).status == "cancelled"
                    async with httpx.AsyncClient() as http:
                        admin = f"http://127.0.0.1:{envoy.settings.envoy_admin_port}/clusters"
                        clusters = (await http.get(admin)).text
                    served = [line for line in clusters.splitlines() if "rq_total" in line]
                    assert len(served) == 2 and all(not line.endswith("::0") for line in served), served
        finally:
            first.stop()
            second.stop()
