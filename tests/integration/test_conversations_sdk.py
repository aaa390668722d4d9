"""The Conversations API through Envoy with the official SDK, and through the typed gRPC API,
on the real model: bodies validated against OpenAI's spec."""

import openai
import pytest
from parley.codec import typed
from parley.v1 import items_pb2, responses_pb2, service_pb2, service_pb2_grpc

from tests.integration.conftest import MODEL
from tests.support.openapi import validate

pytestmark = [pytest.mark.integration, pytest.mark.model]


async def test_a_conversation_of_three_turns(client):
    conversation = await client.conversations.create(metadata={"app": "tests"},
                                                     items=[{"role": "user", "content": "My name is Ada."}])
    validate("ConversationResource", conversation.model_dump())
    for turn in ("Hello!", "What is my name?", "Thanks."):
        response = await client.responses.create(model=MODEL, input=turn, conversation=conversation.id,
                                                 max_output_tokens=24, temperature=0)
        assert response.conversation.id == conversation.id
    # Turn three's prompt held the whole conversation: more tokens than its own input alone.
    alone = await client.responses.input_tokens.count(model=MODEL, input="Thanks.")
    assert response.usage.input_tokens > alone.input_tokens + 20
    items = await client.conversations.items.list(conversation.id, order="asc", limit=100)
    validate("ConversationItemList", items.model_dump(mode="json", exclude_unset=True))
    roles = [item.role for item in items.data]
    assert roles == ["user"] + ["user", "assistant"] * 3
    one = await client.conversations.items.retrieve(items.data[0].id, conversation_id=conversation.id)
    assert one.content[0].text == "My name is Ada."
    added = await client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "Hi"}])
    assert len(added.data) == 1
    after = await client.conversations.items.delete(added.data[0].id, conversation_id=conversation.id)
    assert after.id == conversation.id
    updated = await client.conversations.update(conversation.id, metadata={"app": "tests", "v": "2"})
    assert updated.metadata == {"app": "tests", "v": "2"}
    deleted = await client.conversations.delete(conversation.id)
    validate("DeletedConversationResource", deleted.model_dump())
    with pytest.raises(openai.NotFoundError):
        await client.conversations.retrieve(conversation.id)


async def test_bad_conversation_requests_are_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.conversations.create(metadata={"k": "v" * 600})
    assert caught.value.body["param"] == "metadata.k"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.create(model=MODEL, input="x", conversation="conv_missing")
    assert missing.value.body["param"] == "conversation"
    conversation = await client.conversations.create()
    with pytest.raises(openai.BadRequestError) as both:
        await client.responses.create(model=MODEL, input="x", conversation=conversation.id,
                                      previous_response_id="resp_x")
    assert both.value.body["param"] == "conversation"
    assert (await client.conversations.items.list(conversation.id)).data == []


async def test_the_typed_conversation_rpcs(stack):
    async with stack.channel() as channel:
        stub = service_pb2_grpc.ResponsesStub(channel)
        first = typed.from_json({"type": "message", "role": "user", "content": "Remember 12."}, items_pb2.Item())
        conversation = await stub.CreateConversation(service_pb2.CreateConversationRequest(items=[first]))
        assert conversation.id.startswith("conv_") and conversation.object == "conversation"
        request = typed.from_json({"model": MODEL, "input": "Which number?", "max_output_tokens": 16,
                                   "conversation": conversation.id}, responses_pb2.CreateResponseRequest())
        response = await stub.CreateResponse(request)
        assert response.conversation.id == conversation.id
        page = await stub.ListConversationItems(service_pb2.ListConversationItemsRequest(
            conversation_id=conversation.id, order="asc"))
        assert [item.WhichOneof("type") for item in page.data] == ["message"] * 3
        item = await stub.GetConversationItem(service_pb2.GetConversationItemRequest(
            conversation_id=conversation.id, item_id=page.data[0].message.id))
        assert item == page.data[0]
        gone = await stub.DeleteConversation(service_pb2.DeleteConversationRequest(conversation_id=conversation.id))
        assert gone.deleted and gone.object == "conversation.deleted"
