"""The Conversations API and the `conversation` parameter, against the scripted engine."""

import pytest
from parley.errors import ApiError

from tests.fakes.engines import ScriptedEngine
from tests.support.pipeline import service_on, stream

MODEL = "scripted"


@pytest.fixture
async def service(tmp_path):
    engine = ScriptedEngine(model_id=MODEL, context_window=4096, script=["Noted."])
    async with service_on(tmp_path / "p.sqlite3", engine) as service:
        yield service


def texts(prompt) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in prompt]


async def test_three_turns_see_everything_before_them_and_append_to_the_conversation(service):
    conversations = service.conversations
    conversation = await conversations.create("default", {"metadata": {"topic": "numbers"},
                                                          "items": [{"role": "user", "content": "My number is 7."}]})
    assert conversation["object"] == "conversation" and conversation["id"].startswith("conv_")
    for turn in ("Add 1.", "Add 2."):
        response = await service.create("default", {"model": MODEL, "input": turn,
                                                    "conversation": conversation["id"]})
        assert response["conversation"] == {"id": conversation["id"]}
    events = await stream(service, input="Total?", conversation={"id": conversation["id"]})
    assert events[-1]["type"] == "response.completed"
    assert texts(service.engine.prompts[-1]) == [
        ("user", "My number is 7."), ("user", "Add 1."), ("assistant", "Noted."), ("user", "Add 2."),
        ("assistant", "Noted."), ("user", "Total?")]
    page = await conversations.list_items("default", conversation["id"], limit=None, order="asc", after=None,
                                          include=[])
    assert [item["type"] for item in page["data"]] == ["message"] * 7 and not page["has_more"]
    newest = await conversations.list_items("default", conversation["id"], limit=2, order=None, after=None,
                                            include=[])
    assert [i["id"] for i in newest["data"]] == [i["id"] for i in reversed(page["data"][-2:])] and newest["has_more"]


async def test_items_are_added_fetched_and_deleted(service):
    conversations = service.conversations
    conversation = await conversations.create("default", {})
    added = await conversations.add_items("default", conversation["id"], {"items": [
        {"role": "user", "content": "a"}, {"type": "message", "role": "assistant", "content": "b"}]}, [])
    assert [item["role"] for item in added["data"]] == ["user", "assistant"]
    first = added["data"][0]["id"]
    assert (await conversations.get_item("default", conversation["id"], first, []))["content"][0]["text"] == "a"
    assert (await conversations.delete_item("default", conversation["id"], first))["id"] == conversation["id"]
    with pytest.raises(ApiError) as caught:
        await conversations.get_item("default", conversation["id"], first, [])
    assert caught.value.kind.http_status == 404 and caught.value.param == "item_id"
    updated = await conversations.update("default", conversation["id"], {"metadata": {"k": "v"}})
    assert updated["metadata"] == {"k": "v"}
    assert (await conversations.delete("default", conversation["id"]))["deleted"] is True


async def test_another_projects_conversation_is_not_found_everywhere(service):
    conversations = service.conversations
    conversation = await conversations.create("default", {"items": [{"role": "user", "content": "secret"}]})
    cid = conversation["id"]
    calls = [conversations.get("other", cid), conversations.update("other", cid, {"metadata": {}}),
             conversations.delete("other", cid), conversations.add_items("other", cid, {"items": []}, []),
             conversations.list_items("other", cid, limit=None, order=None, after=None, include=[]),
             service.create("other", {"model": MODEL, "input": "x", "conversation": cid})]
    for call in calls:
        with pytest.raises(ApiError) as caught:
            await call
        assert caught.value.kind.http_status == 404
    assert len((await conversations.list_items("default", cid, limit=None, order=None, after=None,
                                               include=[]))["data"]) == 1


@pytest.mark.parametrize("body, param", [
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"items": [{"role": "robot", "content": "x"}]}, "items[0].role"),
    ({"items": [{"role": "user", "content": "x"}] * 21}, "items"),
    ({"items": [{"type": "item_reference", "id": "msg_nope"}]}, "items[0].id"),
    ({"title": "x"}, "title"),
])
async def test_a_bad_create_is_refused_by_name_and_stores_nothing(service, body, param):
    with pytest.raises(ApiError) as caught:
        await service.conversations.create("default", body)
    assert caught.value.param == param


async def test_a_failed_response_leaves_the_conversation_as_it_was(service):
    conversation = await service.conversations.create("default", {})
    service.engine.fail_after = 0
    events = await stream(service, input="x", conversation=conversation["id"])
    assert events[-1]["type"] == "response.failed"
    page = await service.conversations.list_items("default", conversation["id"], limit=None, order=None, after=None,
                                                  include=[])
    assert page["data"] == []
