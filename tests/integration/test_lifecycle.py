"""Process-level behaviour: `parley run` from the CLI, and state that survives a restart."""

import os
import signal
import subprocess
import sys
import time

import pytest
from openai import AsyncOpenAI, AuthenticationError, OpenAI

from tests.integration.conftest import MODEL
from tests.support.stack import free_port, running_stack

pytestmark = [pytest.mark.integration, pytest.mark.model]


async def test_responses_survive_a_restart(tmp_path):
    path = tmp_path / "durable.sqlite3"
    async with running_stack(path) as stack:
        async with AsyncOpenAI(base_url=stack.base_url, api_key="x", max_retries=0) as client:
            created = await client.responses.create(model=MODEL, input="Remember me.", max_output_tokens=16,
                                                    temperature=0)
    async with running_stack(path) as stack:
        async with AsyncOpenAI(base_url=stack.base_url, api_key="x", max_retries=0) as client:
            fetched = await client.responses.retrieve(created.id)
            assert fetched.model_dump() == created.model_dump()
            follow_up = await client.responses.create(model=MODEL, input="Again.", previous_response_id=created.id,
                                                      max_output_tokens=16)
            assert follow_up.previous_response_id == created.id


@pytest.mark.parametrize("api_key", [None, "sk-bootstrap-0123456789abcdef"], ids=["auth-off", "bootstrap-key"])
def test_parley_run_prints_the_url_serves_and_stops_cleanly(tmp_path, api_key):
    """What `make run` starts; with PARLEY_API_KEY set it works the same for that key only."""
    http_port = free_port()
    env = {**os.environ, "PARLEY_HTTP_PORT": str(http_port), "PARLEY_GRPC_PORT": "0", "PARLEY_METRICS_PORT": "0", "PARLEY_WEBSOCKET_PORT": "0",
           "PARLEY_STORE_PATH": str(tmp_path / "run.sqlite3"), "PARLEY_LOG_FORMAT": "json",
           **({"PARLEY_API_KEY": api_key} if api_key else {})}
    process = subprocess.Popen([sys.executable, "-m", "parley", "run"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "serving" not in line:
            line = process.stdout.readline()
            assert line or process.poll() is None, process.stderr.read()
        expected = f"http://127.0.0.1:{http_port}/v1"
        assert expected in line
        client = OpenAI(base_url=expected, api_key=api_key or "x", max_retries=0)
        assert client.responses.create(model=MODEL, input="Hi", max_output_tokens=16).output_text is not None
        if api_key:
            with pytest.raises(AuthenticationError):
                OpenAI(base_url=expected, api_key="sk-some-other-key", max_retries=0).models.list()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        logs = process.stderr.read()
        assert '"event": "server.stopped"' in logs
        assert ('"event": "auth.on"' if api_key else '"event": "auth.off"') in logs
        assert not api_key or api_key not in logs  # the key never reaches a log line
    finally:
        if process.poll() is None:
            process.kill()


def test_bad_configuration_stops_start_up_with_a_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "parley", "serve"], capture_output=True, text=True,
                            env={**os.environ, "PARLEY_ENGINE": "quantum"}, timeout=60)
    assert result.returncode == 2
    assert "engine must be one of llamacpp, tensorrt_llm, scripted, synthetic, remote, got 'quantum'" in result.stderr


def test_an_open_server_beyond_loopback_is_refused_with_a_message_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "parley", "serve"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PARLEY_ENGINE": "scripted", "PARLEY_GRPC_HOST": "0.0.0.0",
                                 "PARLEY_GRPC_PORT": "0", "PARLEY_METRICS_PORT": "0", "PARLEY_WEBSOCKET_PORT": "0",
                                 "PARLEY_STORE_PATH": str(tmp_path / "open.sqlite3")})
    assert result.returncode == 1
    assert "parley: no API key is configured" in result.stderr and "PARLEY_ALLOW_UNAUTHENTICATED" in result.stderr
    assert "Traceback" not in result.stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().split(")")[-1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
    return found


def test_parley_run_exits_non_zero_soon_after_its_envoy_dies(tmp_path):
    """No REST listener means no service: `parley run` must not look alive without one. Also:
    the admin API is on a private unix socket, on no TCP port."""
    http_port = free_port()
    env = {**os.environ, "PARLEY_HTTP_PORT": str(http_port), "PARLEY_GRPC_PORT": "0", "PARLEY_METRICS_PORT": "0", "PARLEY_WEBSOCKET_PORT": "0", "PARLEY_ENGINE": "scripted",
           "PARLEY_MODEL_NAME": "scripted", "PARLEY_STORE_PATH": str(tmp_path / "run.sqlite3"),
           "PARLEY_LOG_FORMAT": "json"}
    process = subprocess.Popen([sys.executable, "-m", "parley", "run"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = process.stdout.readline()
            assert line or process.poll() is None, process.stderr.read()
        [envoy] = [pid for pid in _children(process.pid) if b"envoy" in open(f"/proc/{pid}/cmdline", "rb").read()]
        config_path = open(f"/proc/{envoy}/cmdline", "rb").read().split(b"\0")[2].decode()
        config = open(config_path).read()
        assert "pipe:" in config and "port_value: 9901" not in config
        killed = time.monotonic()
        os.kill(envoy, signal.SIGKILL)
        assert process.wait(timeout=15) == 1
        assert time.monotonic() - killed < 5
        assert '"event": "envoy.exited"' in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
