"""The Conversations API: durable, ordered item lists that responses append to.

A conversation is an ordered log of items in the store (store/base.py's CONVERSATION_TABLES). A
response created with `conversation` sees every item of it before its own input, and once it
completes (or is cut off by max_output_tokens) its input and output items are appended in the
same transaction that makes its final document durable: what a client saw completed is in the
conversation. Every lookup is scoped to the caller's project (another project's id is a 404).
"""

from __future__ import annotations

import time
from typing import Any

from parley.errors import invalid, invalid_type, not_found
from parley.ids import new_id
from parley.service.includes import checked_include, shape_items
from parley.service.input_items import normalize_input, resolve_references
from parley.service.sealing import Sealer
from parley.service.validation import check_body, item_list, page_bounds, validate_string_map
from parley.store.base import Conversation, ResponseStore, paginate

MAX_ITEMS_AT_ONCE = 20  # OpenAI's limit on items added by one create or add call


def _resource(conversation: Conversation) -> dict:
    return {"id": conversation.id, "object": "conversation", "created_at": conversation.created_at,
            "metadata": conversation.metadata}


class Conversations:
    def __init__(self, store: ResponseStore, sealer: Sealer | None):
        self.store = store
        self.sealer = sealer

    async def _items(self, project: str, value: Any) -> list[dict]:
        """Items a request adds: checked and normalized as input items are, at most 20."""
        if value is None:
            return []
        if not isinstance(value, list):
            raise invalid_type("items", "an array of input items", value)
        if len(value) > MAX_ITEMS_AT_ONCE:
            raise invalid(f"Invalid 'items': array too long. Expected at most {MAX_ITEMS_AT_ONCE} items, got "
                          f"{len(value)}.", "items", "array_above_max_length")
        items = normalize_input(value, "items")
        for index, item in enumerate(items):
            if item["type"] == "compaction_trigger":  # it asks a create for compaction; here it would be stored
                raise invalid("A compaction_trigger is an instruction to POST /v1/responses, not a conversation item.",
                              f"items[{index}].type", "invalid_value")
        await resolve_references(self.store, project, items, "items")
        return items

    async def _existing(self, project: str, conversation_id: str) -> Conversation:
        conversation = await self.store.get_conversation(conversation_id, project)
        if conversation is None:
            raise not_found(f"Conversation with id '{conversation_id}' not found.", "conversation_id")
        return conversation

    async def create(self, project: str, body: Any) -> dict:
        body = check_body(body, {"metadata", "items"})
        conversation = Conversation(new_id("conv"), project, int(time.time()),
                                    validate_string_map(body.get("metadata"), "metadata"))
        await self.store.create_conversation(conversation, await self._items(project, body.get("items")))
        return _resource(conversation)

    async def get(self, project: str, conversation_id: str) -> dict:
        return _resource(await self._existing(project, conversation_id))

    async def update(self, project: str, conversation_id: str, body: Any) -> dict:
        body = check_body(body, {"metadata"})
        if "metadata" not in body:
            raise invalid("Missing required parameter: 'metadata'.", "metadata", "missing_required_parameter")
        metadata = validate_string_map(body["metadata"], "metadata")
        if not await self.store.update_conversation(conversation_id, metadata, project):
            raise not_found(f"Conversation with id '{conversation_id}' not found.", "conversation_id")
        return await self.get(project, conversation_id)

    async def delete(self, project: str, conversation_id: str) -> dict:
        if not await self.store.delete_conversation(conversation_id, project):
            raise not_found(f"Conversation with id '{conversation_id}' not found.", "conversation_id")
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    async def add_items(self, project: str, conversation_id: str, body: Any, include: list[str]) -> dict:
        body = check_body(body, {"items"})
        if "items" not in body:
            raise invalid("Missing required parameter: 'items'.", "items", "missing_required_parameter")
        items = await self._items(project, body["items"])
        checked_include(include, self.sealer)  # refused before anything is added
        if not await self.store.add_conversation_items(conversation_id, items, project):
            raise not_found(f"Conversation with id '{conversation_id}' not found.", "conversation_id")
        return item_list(shape_items(items, include, self.sealer))

    async def list_items(self, project: str, conversation_id: str, *, limit: int | None, order: str | None,
                         after: str | None, include: list[str]) -> dict:
        limit, order = page_bounds(limit, order)
        checked_include(include, self.sealer)
        items = await self.store.conversation_items(conversation_id, project)
        if items is None:
            raise not_found(f"Conversation with id '{conversation_id}' not found.", "conversation_id")
        page = paginate(items, limit=limit, order=order, after=after, before=None)
        return item_list(shape_items(page.items, include, self.sealer), page.has_more)

    async def get_item(self, project: str, conversation_id: str, item_id: str, include: list[str]) -> dict:
        checked_include(include, self.sealer)
        items = await self.store.conversation_items(conversation_id, project)
        if items is None:
            raise not_found(f"Conversation with id '{conversation_id}' not found.", "conversation_id")
        item = next((item for item in items if item["id"] == item_id), None)
        if item is None:
            raise not_found(f"Item with id '{item_id}' not found in conversation '{conversation_id}'.", "item_id")
        return shape_items([item], include, self.sealer)[0]

    async def delete_item(self, project: str, conversation_id: str, item_id: str) -> dict:
        deleted = await self.store.delete_conversation_item(conversation_id, item_id, project)
        if deleted is None:
            raise not_found(f"Conversation with id '{conversation_id}' not found.", "conversation_id")
        if not deleted:
            raise not_found(f"Item with id '{item_id}' not found in conversation '{conversation_id}'.", "item_id")
        return await self.get(project, conversation_id)
