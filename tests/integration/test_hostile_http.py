"""Requests a fuzzer or a hostile client sends, through the real Envoy: every one gets a correct
status with OpenAI's error shape (a JSON content type and {"error": {message, type, param,
code}}), never a 5xx, never a gRPC-shaped body, never silence. Raw sockets, so that nothing
between the test and Envoy tidies the request up."""

import asyncio

import orjson
import pytest

from tests.fakes.engines import ScriptedEngine
from tests.support.stack import running_stack, scripted_stack

pytestmark = pytest.mark.integration

MODEL = "scripted"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory):
    async with scripted_stack(tmp_path_factory, "hostile", http_request_timeout_seconds=2) as running:
        yield running


async def exchange(stack, request: bytes, timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; return (status, headers, body) of the reply (the connection is closed after)."""
    port = stack.envoy.settings.http_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in header_lines:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding") == "chunked":
                body = b""
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    if size == 0:
                        break
                    body += await reader.readexactly(size)
                    await reader.readexactly(2)
            else:
                body = await reader.read()
        return int(status_line.split()[1]), headers, body
    finally:
        writer.close()


def http(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: parley", "Connection: close"]
    headers = {"content-type": "application/json", **(headers or {})} if body else dict(headers or {})
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def openai_error(status: int, headers: dict, body: bytes, expected: int | tuple[int, ...]) -> dict:
    expected = (expected,) if isinstance(expected, int) else expected
    assert status in expected, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


CREATE = orjson.dumps({"model": MODEL, "input": "hi"})


async def test_a_header_name_grpc_metadata_rejects_is_dropped_not_a_500(stack):
    status, headers, body = await exchange(stack, http("POST", "/v1/responses", CREATE, {"x'y": "1"}))
    assert status == 200, body[:300]
    assert orjson.loads(body)["status"] == "completed"


async def test_a_client_grpc_timeout_header_is_not_obeyed(stack):
    status, _, body = await exchange(stack, http("POST", "/v1/responses", CREATE, {"grpc-timeout": "1n"}))
    assert status == 200, body[:300]


@pytest.mark.parametrize("path", ["/v1/responses/abc%7F", "/v1/responses/resp_%01x", "/v1/responses/resp_%7F/cancel"])
async def test_control_characters_in_ids_are_a_clean_404(stack, path):
    method = "POST" if path.endswith("/cancel") else "GET"
    openai_error(*await exchange(stack, http(method, path)), 404)


async def test_non_ascii_in_an_echoed_id_survives(stack):
    status, headers, body = await exchange(stack, http("GET", "/v1/responses/resp_%C3%A9"))
    error = openai_error(status, headers, body, 404)
    assert "resp_é" in error["message"]


@pytest.mark.parametrize("size", [12_000, 60_000])
async def test_huge_ids_and_cursors_are_a_4xx_never_a_429_or_5xx(stack, size):
    for path in (f"/v1/responses/resp_{'a' * size}", f"/v1/responses/resp_x/input_items?after={'a' * size}"):
        status, headers, body = await exchange(stack, http("GET", path))
        error = openai_error(status, headers, body, (400, 404, 414, 431))
        assert len(error["message"]) < 2000  # never echoed back whole


async def test_oversized_headers_are_431_in_openai_shape(stack):
    openai_error(*await exchange(stack, http("GET", "/v1/models", headers={"x-big": "a" * 100_000})), 431)


async def test_http_1_0_gets_an_openai_shaped_reply(stack):
    status, headers, body = await exchange(stack, http("GET", "/v1/models", version="HTTP/1.0"))
    if status != 200:
        openai_error(status, headers, body, 426)


async def test_a_body_shorter_than_its_content_length_times_out_with_408(stack):
    request = http("POST", "/v1/responses", CREATE).replace(f"Content-Length: {len(CREATE)}".encode(),
                                                           b"Content-Length: 100")
    openai_error(*await exchange(stack, request, timeout=10), 408)


async def test_a_body_of_several_envoy_messages_is_served(stack):
    """Envoy forwards a body in 1 MiB messages; the server joins them."""
    body = orjson.dumps({"model": MODEL, "input": "x" * 2_500_000, "metadata": {"end": "here"}})
    status, _, reply = await exchange(stack, http("POST", "/v1/responses", body))
    assert status == 200, reply[:300]
    assert orjson.loads(reply)["metadata"] == {"end": "here"}


async def test_a_body_over_the_limit_is_a_413_in_openai_shape(stack):
    body = b'{"model": "scripted", "input": "' + b"x" * stack.app.settings.max_request_body_bytes + b'"}'
    error = openai_error(*await exchange(stack, http("POST", "/v1/responses", body)), 413)
    assert error["code"] == "request_too_large"


async def test_a_non_json_content_type_is_refused(stack):
    status, headers, body = await exchange(stack, http("POST", "/v1/responses", CREATE,
                                                       {"content-type": "text/plain"}))
    error = openai_error(status, headers, body, 400)
    assert "content type" in error["message"].lower()


@pytest.mark.parametrize("value", ["yes", "2", "TRUE!"])
async def test_a_stream_flag_that_is_not_a_boolean_is_a_400(stack, value):
    created = orjson.loads((await exchange(stack, http("POST", "/v1/responses", CREATE)))[2])
    status, headers, body = await exchange(stack, http("GET", f"/v1/responses/{created['id']}?stream={value}"))
    error = openai_error(status, headers, body, 400)
    assert error["param"] == "stream"


async def test_resuming_after_the_last_event_is_an_empty_event_stream(stack):
    created = orjson.loads((await exchange(stack, http("POST", "/v1/responses", CREATE)))[2])
    status, headers, body = await exchange(stack, http("GET", f"/v1/responses/{created['id']}?stream=true"))
    last = max(orjson.loads(line[6:])["sequence_number"] for line in body.decode().splitlines()
               if line.startswith("data: {"))
    status, headers, body = await exchange(stack, http(
        "GET", f"/v1/responses/{created['id']}?stream=true&starting_after={last}"))
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), (status, headers)
    assert body == b"data: [DONE]\n\n"


async def test_an_empty_item_list_has_string_ids(stack):
    created = orjson.loads((await exchange(stack, http("POST", "/v1/responses", CREATE)))[2])
    first_item = orjson.loads((await exchange(stack, http(
        "GET", f"/v1/responses/{created['id']}/input_items?order=asc")))[2])["data"][0]["id"]
    status, _, body = await exchange(stack, http(
        "GET", f"/v1/responses/{created['id']}/input_items?order=asc&after={first_item}"))
    page = orjson.loads(body)
    assert status == 200 and page["data"] == [] and page["first_id"] == "" and page["last_id"] == ""


async def test_the_rest_port_serves_no_grpc_unless_told_to(stack, tmp_path):
    import grpc
    from parley.v1 import service_pb2, service_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.envoy.settings.http_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await service_pb2_grpc.ResponsesStub(channel).ListModels(service_pb2.ListModelsRequest())
        assert refused.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)
    engine = ScriptedEngine(model_id=MODEL)
    async with running_stack(tmp_path / "g.sqlite3", engine=engine, rest_port_serves_grpc=True) as serving:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{serving.envoy.settings.http_port}") as channel:
            models = await service_pb2_grpc.ResponsesStub(channel).ListModels(service_pb2.ListModelsRequest())
        assert [model.id for model in models.data] == [MODEL]
