"""The baseline: the limit of this machine for the REST streaming path.

A minimal grpc.aio server implementing `ResponsesHttp.HttpCreateResponse` that streams canned
SSE bytes, the same events and the same message grouping a Parley response on the synthetic
engine produces, through the same Envoy config. No validation, no pipeline, no store.
Usage: python bench/baseline_server.py PORT EVENTS_FILE
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import uvloop
from google.api import httpbody_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from parley.v1 import service_pb2_grpc


class CannedResponses(service_pb2_grpc.ResponsesHttpServicer):
    def __init__(self, messages: list[bytes]):
        self.messages = [httpbody_pb2.HttpBody(content_type="text/event-stream", data=m) for m in messages]

    async def HttpCreateResponse(self, request, context):
        for message in self.messages:
            await asyncio.sleep(0)  # let other streams in between messages, as Parley's engine does
            yield message


async def main(port: int, events_file: str) -> None:
    with open(events_file) as handle:
        batches = json.load(handle)  # a list of batches of SSE frames, as Parley sent them
    messages = ["".join(batch).encode() for batch in batches]
    server = grpc.aio.server()
    service_pb2_grpc.add_ResponsesHttpServicer_to_server(CannedResponses(messages), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await checks.set("parley.v1.Responses", health_pb2.HealthCheckResponse.SERVING)
    print(f"baseline listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
