"""Acknowledged means durable, tested by killing the server (SIGKILL) at the worst moments: right
after the client received a response's id (`response.created`), and right after it received the
terminal event. After a restart on the same store, the response must exist, and a finished one
must be stored exactly as the client saw it, with every event it was sent.

`PARLEY_KILL_CYCLES` sets the cycles per store (a handful by default; the reliability run uses
more)."""

import os

import grpc
import pytest
from parley.codec import typed
from parley.v1 import responses_pb2, service_pb2, service_pb2_grpc

from tests.support.postgres import store_for
from tests.support.processes import ServerProcess
from tests.support.stack import free_port

pytestmark = pytest.mark.integration

MODEL = "scripted"
CYCLES = int(os.environ.get("PARLEY_KILL_CYCLES", "4"))
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


async def stream_until(target: str, kill_at: tuple[str, ...], server: ServerProcess) -> list[dict]:
    """Stream one response; SIGKILL the server the moment an event of a type in `kill_at` arrives."""
    seen = []
    async with grpc.aio.insecure_channel(target) as channel:
        request = typed.from_json({"model": MODEL, "input": "go", "max_output_tokens": 64},
                                  responses_pb2.CreateResponseRequest())
        async for event in service_pb2_grpc.ResponsesStub(channel).StreamCreateResponse(request):
            seen.append(typed.to_json(event))
            if seen[-1]["type"] in kill_at:
                server.kill()
                break
    return seen


async def stored(target: str, response_id: str) -> tuple[dict, list[dict]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.ResponsesStub(channel)
        document = typed.to_json(await stub.GetResponse(service_pb2.GetResponseRequest(response_id=response_id)))
        if document["status"] in ("queued", "in_progress"):  # its replica died mid-stream: nothing to replay yet
            return document, []
        follow = stub.FollowResponse(service_pb2.FollowResponseRequest(response_id=response_id, starting_after=-1))
        return document, [typed.to_json(event) async for event in follow]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_nothing_a_client_saw_is_lost_or_changed_by_a_kill(kind, tmp_path):
    lost, regressed = [], []
    with store_for(kind, tmp_path) as store:
        settings = {**store, "scripted_output_tokens": 40, "scripted_token_delay_ms": 1}
        for cycle in range(CYCLES):
            at_terminal = cycle % 2 == 1
            server = ServerProcess(**settings, grpc_port=free_port()).start()
            try:
                seen = await stream_until(server.target, TERMINAL if at_terminal else ("response.created",), server)
            finally:
                server.stop()
            response_id = seen[0]["response"]["id"]
            again = ServerProcess(**settings, grpc_port=free_port()).start()
            try:
                try:
                    document, events = await stored(again.target, response_id)
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.NOT_FOUND, error
                    lost.append(response_id)
                    continue
                if at_terminal and (document != seen[-1]["response"] or events != seen):
                    regressed.append((response_id, document["status"], len(events), len(seen)))
            finally:
                again.stop()
    assert lost == [] and regressed == [], f"lost {lost}, regressed {regressed}"
