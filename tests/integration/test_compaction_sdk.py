"""Compaction through Envoy with the official SDK: on a scripted engine that records its prompts
(the round trip keeps the facts), and on the real model (the protocol holds)."""

import httpx
import orjson
import pytest
from openai import AsyncOpenAI

from tests.integration.conftest import MODEL
from tests.support import openapi
from tests.support.stack import scripted_stack
from tests.support.streams import check_stream, event_types

pytestmark = [pytest.mark.integration]

FACTS = [{"role": "user", "content": "The launch is on the 14th, in Lyon."},
         {"type": "message", "role": "assistant", "content": "Got it: the 14th, Lyon."}]


async def test_a_compacted_window_sent_back_keeps_the_facts(tmp_path_factory):
    async with scripted_stack(tmp_path_factory, "compaction") as stack, \
            AsyncOpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as client:
        stack.engine.script = ["Launch:", " the 14th,", " Lyon."]
        # The raw body: the SDK's model reads the window's user messages as output messages.
        raw = await client.responses.with_raw_response.compact(model="scripted", input=FACTS)
        compacted = orjson.loads(raw.content)
        assert compacted["object"] == "response.compaction"
        openapi.validate("CompactResource", compacted)
        window = compacted["output"]
        assert [item["type"] for item in window] == ["message", "compaction"]
        stack.engine.script = ["Lyon."]
        answer = await client.responses.create(model="scripted", input=[*window,
                                               {"role": "user", "content": "Where is the launch?"}])
        assert answer.status == "completed"
        contents = [message.content for message in stack.engine.prompts[-1]]
        assert "Summary of the conversation before this point:\nLaunch: the 14th, Lyon." in contents
        assert "Got it: the 14th, Lyon." not in contents  # the assistant's turn lives on in the summary


@pytest.mark.model
async def test_a_compaction_trigger_streams_one_compaction_item_on_the_real_model(stack, client):
    first = await client.responses.create(model=MODEL, input=FACTS, max_output_tokens=24, temperature=0)
    async with httpx.AsyncClient(timeout=120) as http:
        reply = await http.post(f"{stack.base_url}/responses", json={
            "model": MODEL, "previous_response_id": first.id, "stream": True, "max_output_tokens": 64,
            "input": [{"type": "compaction_trigger"}]})
    events = [orjson.loads(line[6:]) for line in reply.content.split(b"\n")
              if line.startswith(b"data: ") and line != b"data: [DONE]"]
    assert event_types(events) == ["response.created", "response.in_progress", "response.output_item.added",
                                   "response.output_item.done", events[-1]["type"]]
    response = check_stream(events)
    assert response["status"] in ("completed", "incomplete")
    assert [item["type"] for item in response["output"]] == ["compaction"]
    openapi.validate("Response", response)
    follow = await client.responses.create(model=MODEL, previous_response_id=response["id"], max_output_tokens=16,
                                           input="Where is the launch?")
    assert follow.status in ("completed", "incomplete")
