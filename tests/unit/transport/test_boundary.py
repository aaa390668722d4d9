"""The error boundary, end to end through Envoy, with the scripted engine (no model needed)."""

import httpx
import pytest
from parley.errors import ApiError, ErrorKind

from tests.fakes.engines import ScriptedEngine
from tests.support.stack import running_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def stack(tmp_path_factory):
    engine = ScriptedEngine(model_id="scripted")
    async with running_stack(tmp_path_factory.mktemp("boundary") / "b.sqlite3", engine=engine) as running:
        yield running


async def test_unexpected_crash_is_a_generic_500_without_internals(stack, monkeypatch):
    async def explode(project, response_id):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(stack.app.service, "get", explode)
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{stack.base_url}/responses/resp_x")
    assert reply.status_code == 500, reply.text
    error = reply.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "server_error"
    assert "secret" not in reply.text and "RuntimeError" not in reply.text


async def test_api_errors_keep_their_status_and_request_id_header(stack):
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{stack.base_url}/responses/resp_missing")
    assert reply.status_code == 404
    assert reply.json()["error"]["param"] == "response_id"
    assert reply.headers["x-request-id"]
    assert not any(name.startswith("grpc-") or name == "x-openai-error" for name in reply.headers)


async def test_scripted_engine_serves_through_envoy(stack):
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{stack.base_url}/responses", json={"model": "scripted", "input": "hi"})
    assert reply.status_code == 200
    assert reply.json()["output"][0]["content"][0]["text"] == "Hello from Parley's scripted engine."


async def test_a_status_grpc_has_no_code_for_reaches_the_client(stack, monkeypatch):
    async def too_large(project, response_id, include=()):
        raise ApiError(ErrorKind.TOO_LARGE, "too large", None, "request_too_large")

    monkeypatch.setattr(stack.app.service, "get", too_large)
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{stack.base_url}/responses/resp_x")
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["code"] == "request_too_large"
    assert "x-http-status" not in reply.headers
