"""The baseline: the limit of this machine for the REST streaming path.

A minimal grpc.aio server implementing `ResponsesHttp.HttpCreateResponseChunked` (the RPC that
POST /v1/responses maps to: it reads the body's messages, as Parley does) that streams canned
SSE bytes, the same events and the same message grouping a Parley response on the synthetic
engine produces, through the same Envoy config. No validation, no pipeline, no store.
With TOKENS_PER_SECOND, each message leaves when the synthetic engine paced at that rate would
have produced its first text delta: the same messages at a CPU model's pace.
Usage: python bench/baseline_server.py PORT EVENTS_FILE [TOKENS_PER_SECOND]
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys

import grpc
import uvloop
from google.api import httpbody_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from parley.v1 import service_pb2_grpc

DELTA = b"event: response.output_text.delta\n"


class CannedResponses(service_pb2_grpc.ResponsesHttpServicer):
    def __init__(self, messages: list[bytes], tokens_per_second: float = 0.0):
        self.messages = [httpbody_pb2.HttpBody(content_type="text/event-stream", data=m) for m in messages]
        self.tokens_per_second = tokens_per_second
        # Text deltas sent before each message: its token's due time when paced.
        self.deltas_before = list(itertools.accumulate((m.count(DELTA) for m in messages), initial=0))[:-1]

    async def HttpCreateResponseChunked(self, request_iterator, context):
        async for _ in request_iterator:  # the body, read whole as Parley reads it
            pass
        async for message in self._canned():
            yield message

    async def _canned(self):
        loop = asyncio.get_running_loop()
        start = loop.time()
        for message, deltas_before in zip(self.messages, self.deltas_before, strict=True):
            wait = start + deltas_before / self.tokens_per_second - loop.time() if self.tokens_per_second > 0 else 0
            await asyncio.sleep(max(wait, 0))  # also lets other streams in between messages, as Parley's engine does
            yield message


async def main(port: int, events_file: str, tokens_per_second: float) -> None:
    with open(events_file) as handle:
        batches = json.load(handle)  # a list of batches of SSE frames, as Parley sent them
    messages = ["".join(batch).encode() for batch in batches]
    server = grpc.aio.server()
    service_pb2_grpc.add_ResponsesHttpServicer_to_server(CannedResponses(messages, tokens_per_second), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await checks.set("parley.v1.Responses", health_pb2.HealthCheckResponse.SERVING)
    print(f"baseline listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0))
