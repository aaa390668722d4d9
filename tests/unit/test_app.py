"""The composition root: the gRPC health service, and the WebSocket port's /healthz that Envoy
checks, follow the engine's health."""

import asyncio

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from parley import app as app_module
from parley.v1 import responses_pb2, service_pb2_grpc

from tests.fakes.engines import ScriptedEngine
from tests.support.stack import running_stack

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def next_status(updates, wanted):
    async with asyncio.timeout(10):
        async for update in updates:
            if update.status == wanted:
                return


async def test_a_dead_engine_turns_health_not_serving_and_refuses_work_with_503(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "ENGINE_HEALTH_INTERVAL_SECONDS", 0.05)
    engine = ScriptedEngine(model_id="scripted")
    async with running_stack(tmp_path / "h.sqlite3", engine=engine, gateway=False) as stack, stack.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        updates = health.Watch(health_pb2.HealthCheckRequest(service=""))
        websocket_health = f"http://127.0.0.1:{stack.app.websocket_port}/healthz"
        await next_status(updates, SERVING)
        async with httpx.AsyncClient() as http:
            assert (await http.get(websocket_health)).status_code == 200
            engine.dead = "the GPU fell off the bus"
            await next_status(updates, NOT_SERVING)
            checked = await health.Check(health_pb2.HealthCheckRequest(service="parley.v1.Responses"))
            assert checked.status == NOT_SERVING
            assert (await http.get(websocket_health)).status_code == 503

        responses = service_pb2_grpc.ResponsesStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await responses.CreateResponse(responses_pb2.CreateResponseRequest(
                model="scripted", input=responses_pb2.Input(text="hi")))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "GPU fell off the bus" in refused.value.details()

        engine.dead = None
        await next_status(updates, SERVING)
        updates.cancel()
        async with httpx.AsyncClient() as http:
            assert (await http.get(websocket_health)).text == "SERVING\n"


async def test_without_keys_it_refuses_to_listen_beyond_loopback_unless_told(tmp_path):
    engine = ScriptedEngine(model_id="scripted")
    with pytest.raises(RuntimeError, match="PARLEY_ALLOW_UNAUTHENTICATED"):
        async with running_stack(tmp_path / "open.sqlite3", engine=engine, gateway=False, grpc_host="0.0.0.0"):
            pass
    async with running_stack(tmp_path / "open.sqlite3", engine=engine, gateway=False, grpc_host="0.0.0.0",
                             allow_unauthenticated=True) as stack:
        assert stack.app.grpc_port
    # With a key it may listen anywhere.
    async with running_stack(tmp_path / "keyed.sqlite3", engine=engine, gateway=False, grpc_host="0.0.0.0",
                             api_key="sk-a-long-enough-key") as stack:
        assert stack.app.grpc_port
