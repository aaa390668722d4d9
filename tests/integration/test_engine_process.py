"""Real processes: one `parley engine`, two `parley serve --engine remote` on one PostgreSQL behind
one Envoy, the official SDK through both, and the engine process killed under a stream."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai import AsyncOpenAI

from tests.support import postgres
from tests.support.processes import ServerProcess
from tests.support.stack import envoy_over

pytestmark = pytest.mark.integration

MODEL = "scripted"


class EngineProcess:
    """`parley engine` with the scripted engine, listening on `socket_path`."""

    def __init__(self, socket_path: str, **settings):
        self.socket_path = socket_path
        self.env = {**os.environ, "PARLEY_ENGINE": "scripted", "PARLEY_MODEL_NAME": MODEL, "PARLEY_LOG_FORMAT": "json",
                    "PARLEY_ENGINE_SOCKET": socket_path,
                    **{f"PARLEY_{k.upper()}": str(v) for k, v in settings.items()}}
        self.process: subprocess.Popen | None = None
        self.stderr_lines: list[str] = []

    def start(self, timeout: float = 60) -> "EngineProcess":
        self.process = subprocess.Popen([sys.executable, "-m", "parley", "engine"], env=self.env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: self.stderr_lines.extend(self.process.stderr), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if re.search(r"Parley engine process \(scripted, scripted\) listening on ", line):
                return self
            if not line and self.process.poll() is not None:
                raise RuntimeError("parley engine exited:\n" + "".join(self.stderr_lines[-30:]))
        raise RuntimeError("parley engine did not start in time")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def engine_socket():
    # A short directory of its own: a Unix socket's path is limited to 107 bytes.
    directory = tempfile.mkdtemp(prefix="pe-", dir="/tmp")
    yield str(Path(directory) / "engine.sock")
    Path(directory, "engine.sock").unlink(missing_ok=True)
    os.rmdir(directory)


async def _is(check, expected) -> bool:
    return await check == expected


async def until(predicate, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = await predicate()
        if outcome:
            return outcome
        await asyncio.sleep(0.2)
    raise AssertionError("the condition never held")


async def health_of(server: ServerProcess) -> tuple[int, int]:
    """(liveness, readiness) as the pod's probes ask: the service "" and the Responses service."""
    async with grpc.aio.insecure_channel(server.target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        return tuple([(await check(health_pb2.HealthCheckRequest(service=name))).status
                      for name in ("", "parley.v1.Responses")])


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def test_two_servers_share_one_engine_process_and_survive_its_restart(engine_socket):
    engine = EngineProcess(engine_socket, scripted_output_tokens=400, scripted_token_delay_ms=10).start()
    assert os.stat(engine_socket).st_mode & 0o777 == 0o600
    servers = []
    try:
        with postgres.fresh_schema() as dsn:
            for replica in ("replica-a", "replica-b"):
                servers.append(ServerProcess(engine="remote", engine_socket=engine_socket, store_dsn=dsn,
                                             replica_id=replica).start())
            async with envoy_over(*(server.target for server in servers)) as envoy:
                async with AsyncOpenAI(base_url=envoy.url, api_key="x", max_retries=0) as client:
                    models = await client.models.list()
                    assert [model.id for model in models.data] == [MODEL]  # from the engine process
                    done = [await client.responses.create(model=MODEL, input=f"turn {n}", max_output_tokens=16)
                            for n in range(6)]
                    # 400 scripted tokens, 16 asked for: cut at max_output_tokens, as a model would be
                    assert {(r.status, r.incomplete_details.reason) for r in done} == {("incomplete", "max_output_tokens")}
                    assert {response.output_text for response in done} == {"tok " * 16}
                    assert {response.usage.output_tokens for response in done} == {16}
                    async with httpx.AsyncClient() as http:
                        clusters = (await http.get(f"http://127.0.0.1:{envoy.settings.envoy_admin_port}/clusters")).text
                    served = [line for line in clusters.splitlines() if "rq_total" in line]
                    assert len(served) == 2 and all(not line.endswith("::0") for line in served), served

                    # The engine process dies under a stream: the stream fails with a clear error,
                    # both servers refuse new work with 503 until it is back, then serve again.
                    stream = await client.responses.create(model=MODEL, input="long", stream=True)
                    events = []
                    async for event in stream:
                        events.append(event)
                        if event.type == "response.output_text.delta":
                            engine.kill()
                            break
                    rest = [event async for event in stream]
                    assert rest[-1].type == "response.failed"
                    assert "engine process went away" in rest[-1].response.error.message

                    async def refused():
                        try:
                            await client.responses.create(model=MODEL, input="now?", max_output_tokens=16)
                        except openai.APIStatusError as exc:
                            return exc
                        return None

                    refusal = await until(refused)
                    assert refusal.status_code == 503
                    assert refusal.body["code"] == "engine_unavailable", refusal.body
                    # Not ready, but alive: restarting a server would not bring its engine back.
                    for server in servers:
                        assert await until(lambda s=server: _is(health_of(s), (SERVING, NOT_SERVING)))

                    engine = EngineProcess(engine_socket, scripted_output_tokens=400,
                                           scripted_token_delay_ms=1).start()

                    async def served_again():
                        try:
                            return await client.responses.create(model=MODEL, input="back?", max_output_tokens=16)
                        except openai.APIStatusError:
                            return None

                    for _ in range(4):  # whichever replica Envoy picks has reconnected
                        assert (await until(served_again)).output_text == "tok " * 16
                    for server in servers:
                        assert await until(lambda s=server: _is(health_of(s), (SERVING, SERVING)))
                    stored = await client.responses.retrieve(done[0].id)
                    assert stored.output_text == done[0].output_text
    finally:
        for server in servers:
            server.stop()
        engine.stop()
