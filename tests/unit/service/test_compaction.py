"""Compaction against the scripted engine, which records its prompts: the standalone endpoint,
the compaction_trigger item, and a compaction item sent back."""

import pytest
from parley.errors import ApiError
from parley.service.sealing import COMPACTION, Sealer

from tests.fakes.engines import ScriptedEngine
from tests.support.pipeline import service_on, stream
from tests.support.streams import check_stream, event_types

MODEL = "scripted"
SUMMARY = "The user's locker code is 4471."
SEALER = Sealer(b"s" * 32)


@pytest.fixture
async def service(tmp_path):
    engine = ScriptedEngine(model_id=MODEL, context_window=4096, script=["The user's locker code", " is 4471."])
    async with service_on(tmp_path / "p.sqlite3", engine, sealer=SEALER) as service:
        yield service


CONTEXT = [{"role": "user", "content": "My locker code is 4471."},
           {"type": "message", "role": "assistant", "content": "Noted."},
           {"role": "user", "content": "Thanks."}]


async def test_compact_returns_the_user_messages_and_a_sealed_summary_that_restores_the_facts(service):
    result = await service.compact("default", {"model": MODEL, "input": CONTEXT})
    assert result["object"] == "response.compaction" and result["usage"]["output_tokens"] == 2
    *kept, compaction = result["output"]
    assert [item["content"][0]["text"] for item in kept] == ["My locker code is 4471.", "Thanks."]
    assert compaction["type"] == "compaction" and compaction["id"].startswith("cmp_")
    assert SEALER.open(compaction["encrypted_content"], "x", COMPACTION) == [{"type": "summary_text",
                                                                             "text": SUMMARY}]
    summarising = service.engine.prompts[-1]
    assert "compacting a conversation" in summarising[0].content and summarising[-1].role == "user"
    assert await service.store.get(result["id"]) is None  # nothing stored

    service.engine.script = ["4471."]
    await service.create("default", {"model": MODEL, "input": [*result["output"],
                                                               {"role": "user", "content": "What is my code?"}]})
    prompt = [(m.role, m.content) for m in service.engine.prompts[-1]]
    assert ("user", f"Summary of the conversation before this point:\n{SUMMARY}") in prompt
    assert prompt[-1] == ("user", "What is my code?")


async def test_a_compaction_trigger_makes_the_response_one_compaction_item(service):
    first = await service.create("default", {"model": MODEL, "input": CONTEXT})
    events = await stream(service, previous_response_id=first["id"], input=[{"type": "compaction_trigger"}])
    assert event_types(events) == ["response.created", "response.in_progress", "response.output_item.added",
                                   "response.output_item.done", "response.completed"]
    response = check_stream(events)
    assert [item["type"] for item in response["output"]] == ["compaction"]
    assert SEALER.open(response["output"][0]["encrypted_content"], "x", COMPACTION)[0]["text"] == SUMMARY
    assert (await service.get("default", response["id"]))["output"] == response["output"]
    # The stored response continues from its compaction: the summary, not the old turns.
    service.engine.script = ["4471."]
    await service.create("default", {"model": MODEL, "previous_response_id": response["id"], "input": "Code?"})
    contents = [m.content for m in service.engine.prompts[-1]]
    assert contents == ["My locker code is 4471.", "Thanks.", f"Summary of the conversation before this point:\n{SUMMARY}",
                        "Code?"]  # the user's messages and the summary: the assistant's turn is in the summary


@pytest.mark.parametrize("body, param", [
    ({"input": [{"type": "compaction_trigger"}, {"role": "user", "content": "x"}]}, "input[0]"),
    ({"input": [{"type": "compaction", "encrypted_content": "forged"}]}, "input[0].encrypted_content"),
    ({"input": [{"role": "user", "content": "x"}, {"type": "compaction_trigger"}],
      "text": {"format": {"type": "json_object"}}}, "text"),
    ({"input": "x", "context_management": [{"type": "compaction", "compact_threshold": 10}]},
     "context_management[0].compact_threshold"),
    ({"input": "x", "context_management": [{"type": "summarise"}]}, "context_management[0].type"),
    ({"input": "x", "reasoning": {"mode": "pro"}}, "reasoning.mode"),
])
async def test_bad_compaction_requests_are_refused_by_name(service, body, param):
    with pytest.raises(ApiError) as caught:
        await service.create("default", {"model": MODEL, **body})
    assert caught.value.kind.http_status == 400 and caught.value.param == param


async def test_compact_refuses_create_only_fields(service):
    with pytest.raises(ApiError) as caught:
        await service.compact("default", {"input": "x", "tools": []})
    assert caught.value.param == "tools"


async def test_a_compaction_item_of_another_kind_of_blob_does_not_open(service):
    reasoning_blob = SEALER.seal([{"type": "summary_text", "text": "x"}])  # sealed as reasoning
    with pytest.raises(ApiError) as caught:
        await service.create("default", {"model": MODEL, "input": [
            {"type": "compaction", "encrypted_content": reasoning_blob}, {"role": "user", "content": "x"}]})
    assert caught.value.param == "input[0].encrypted_content"


async def test_context_management_compacts_the_history_first_when_past_the_threshold(service):
    service.engine.script = ["ok " * 1200]  # one long answer: the chain passes 1,000 tokens
    first = await service.create("default", {"model": MODEL, "input": CONTEXT})
    service.engine.script = ["The user's locker code", " is 4471."]
    events = await stream(service, previous_response_id=first["id"], input="What is my code?",
                          context_management=[{"type": "compaction", "compact_threshold": 1000}])
    response = check_stream(events)
    assert [item["type"] for item in response["output"]] == ["compaction", "message"]
    assert SEALER.open(response["output"][0]["encrypted_content"], "x", COMPACTION)[0]["text"] == SUMMARY
    summarising, answering = service.engine.prompts[-2:]
    assert "compacting a conversation" in summarising[0].content
    assert [(m.role, m.content) for m in answering] == [
        ("user", "My locker code is 4471."), ("user", "Thanks."),
        ("user", f"Summary of the conversation before this point:\n{SUMMARY}"), ("user", "What is my code?")]
    assert response["usage"]["output_tokens"] == 4  # the summary's two tokens and the answer's two
    # Below the threshold, nothing is compacted.
    events = await stream(service, input="Hi", context_management=[{"type": "compaction"}])
    assert [item["type"] for item in check_stream(events)["output"]] == ["message"]
