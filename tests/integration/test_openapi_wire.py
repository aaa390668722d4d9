"""The raw bytes Envoy returns, validated against the official OpenAPI spec (skipped without it)."""

import httpx
import orjson
import pytest

from tests.integration.conftest import MODEL
from tests.support import openapi
from tests.unit.codec.test_openapi_conformance import EVENT_SCHEMAS

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture
async def http(stack):
    openapi.require_spec()
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        yield client


async def test_wire_documents_match_the_spec(http):
    created = await http.post("/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 16,
                                                   "metadata": {"k": "v"}, "temperature": 0})
    document = created.json()
    openapi.validate("Response", document)
    openapi.validate("Response", (await http.get(f"/responses/{document['id']}")).json())
    openapi.validate("ResponseItemList", (await http.get(f"/responses/{document['id']}/input_items")).json())
    openapi.validate("ListModelsResponse", (await http.get("/models")).json())
    openapi.validate("ErrorResponse", (await http.post("/responses", json={"model": "x", "input": "y"})).json())
    openapi.validate("ErrorResponse", (await http.get("/responses/resp_missing")).json())
    deleted = (await http.delete(f"/responses/{document['id']}")).json()
    assert deleted == {"id": document["id"], "object": "response", "deleted": True}  # the spec gives no schema


async def test_wire_events_match_the_spec(http):
    async with http.stream("POST", "/responses", json={"model": MODEL, "input": "Hi", "stream": True,
                                                        "max_output_tokens": 16, "temperature": 0}) as reply:
        lines = [line async for line in reply.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"  # Open Responses: the terminal event is the literal [DONE]
    events = [orjson.loads(line[6:]) for line in lines[:-1]]
    for event in events:
        openapi.validate(EVENT_SCHEMAS[event["type"]], event)
    assert {e["type"] for e in events} >= {"response.created", "response.output_text.delta"}


async def test_wire_documents_and_events_match_the_open_responses_spec(http):
    openapi.require_open_responses()
    document = (await http.post("/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 16,
                                                     "temperature": 0, "presence_penalty": 0.5})).json()
    openapi.validate_open_responses("ResponseResource", document)
    async with http.stream("POST", "/responses", json={"model": MODEL, "input": "Hi", "stream": True,
                                                        "max_output_tokens": 16, "temperature": 0}) as reply:
        lines = [line async for line in reply.aiter_lines() if line.startswith("data: ")]
    checked = 0
    for event in map(orjson.loads, (line[6:] for line in lines[:-1])):
        schema = openapi.open_responses_event_schema(event["type"])
        if schema is not None:
            openapi.validate_open_responses(schema, event)
            checked += 1
    assert checked == len(lines) - 1  # a text reply uses only events both specs name alike
    compacted = (await http.post("/responses/compact", json={"model": MODEL, "input": "Remember 7."})).json()
    openapi.validate("CompactResource", compacted)
    schemas, _ = openapi._open_responses()
    compact_schema = next(name for name, schema in schemas.items()
                          if (schema.get("properties") or {}).get("object", {}).get("enum") == ["response.compaction"])
    openapi.validate_open_responses(compact_schema, compacted)
