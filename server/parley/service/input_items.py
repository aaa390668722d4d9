"""Input items, as a request sends them, checked and normalized to their stored form (each with
an id). Every rejection names the offending field the way OpenAI does (`input[2].content[0].type`).
"""

from __future__ import annotations

from typing import Any

from parley.errors import invalid, invalid_type, not_found
from parley.ids import new_id

ROLES = ("user", "assistant", "system", "developer")
ITEM_STATUSES = ("in_progress", "completed", "incomplete")
SUPPORTED_ITEM_TYPES = ("message", "function_call", "function_call_output", "custom_tool_call",
                        "custom_tool_call_output", "reasoning", "item_reference", "compaction", "compaction_trigger")
# The fields each item and content part may carry; anything else is refused by name, never
# dropped unseen. `phase` (an assistant message's commentary or final answer; Open Responses and
# OpenAI) is kept as sent.
ITEM_FIELDS = {
    "message": {"type", "id", "role", "content", "status", "phase"},
    "function_call": {"type", "id", "call_id", "name", "arguments", "status", "namespace"},
    "function_call_output": {"type", "id", "call_id", "output", "status", "name", "namespace"},
    "custom_tool_call": {"type", "id", "call_id", "name", "input", "namespace"},
    "custom_tool_call_output": {"type", "id", "call_id", "output"},
    "reasoning": {"type", "id", "summary", "content", "encrypted_content", "status"},
    "item_reference": {"type", "id"},
    "compaction": {"type", "id", "encrypted_content", "created_by"},
    "compaction_trigger": {"type"},
}
PART_FIELDS = {
    "input_text": {"type", "text"},
    "output_text": {"type", "text", "annotations", "logprobs"},
    "refusal": {"type", "refusal"},
}


def _no_unknown_fields(value: dict, allowed: set[str], param: str) -> None:
    for key in value:
        if key not in allowed:
            raise invalid(f"Unknown parameter: '{param}.{key}'.", f"{param}.{key}", "unknown_parameter")


def _normalize_content(content: Any, role: str, param: str) -> list[dict]:
    output_role = role == "assistant"
    text_type = "output_text" if output_role else "input_text"
    if isinstance(content, str):
        return [_text_part(text_type, content)]
    if not isinstance(content, list):
        raise invalid_type(param, "a string or an array of content parts", content)
    parts = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise invalid_type(where, "an object", part)
        kind = part.get("type")
        if not isinstance(kind, str):
            raise invalid_type(f"{where}.type", "a string", kind)
        if kind in PART_FIELDS:
            _no_unknown_fields(part, PART_FIELDS[kind], where)
        if kind in ("input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise invalid_type(f"{where}.text", "a string", part.get("text"))
            if output_role != (kind == "output_text"):
                allowed = "'output_text' and 'refusal'" if output_role else "'input_text', 'input_image' and 'input_file'"
                raise invalid(f"Invalid value: '{kind}'. Supported values for role '{role}' are: {allowed}.",
                              f"{where}.type", "invalid_value")
            parts.append(_text_part(kind, part["text"]))
        elif kind == "refusal" and output_role:
            if not isinstance(part.get("refusal"), str):
                raise invalid_type(f"{where}.refusal", "a string", part.get("refusal"))
            parts.append({"type": "refusal", "refusal": part["refusal"]})
        elif kind in ("input_image", "input_file"):
            raise invalid(f"The served model accepts text only; '{kind}' content is not supported.",
                          f"{where}.type", "unsupported_content")
        else:
            raise invalid(f"Invalid value: {kind!r}. Supported content part types are 'input_text' and "
                          "'output_text'.", f"{where}.type", "invalid_value")
    return parts


def _with_strings(normalized: dict, item: dict, keys: tuple[str, ...], param: str) -> dict:
    """`normalized` with those of the optional string fields `keys` that `item` sets."""
    for key in keys:
        if item.get(key) is not None:
            if not isinstance(item[key], str):
                raise invalid_type(f"{param}.{key}", "a string", item[key])
            normalized[key] = item[key]
    return normalized


def _text_parts(parts: Any, kind: str, param: str) -> list[dict]:
    """A reasoning item's summary or content: parts `{"type": kind, "text": ...}`."""
    if not isinstance(parts, list):
        raise invalid_type(param, "an array", parts)
    for index, part in enumerate(parts):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise invalid_type(where, "an object", part)
        if part.get("type") != kind:
            raise invalid(f"Invalid value: {part.get('type')!r}. Supported values are: '{kind}'.", f"{where}.type",
                          "invalid_value")
        _no_unknown_fields(part, {"type", "text"}, where)
        if not isinstance(part.get("text"), str):
            raise invalid_type(f"{where}.text", "a string", part.get("text"))
    return parts


def _text_part(kind: str, text: str) -> dict:
    if kind == "output_text":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "input_text", "text": text}


def _normalize_item(item: Any, param: str) -> dict:
    if not isinstance(item, dict):
        raise invalid_type(param, "an object", item)
    kind = item.get("type")
    if kind is None:  # EasyInputMessage may omit `type`, and so may an ItemReferenceParam
        kind = "item_reference" if "role" not in item and set(item) <= ITEM_FIELDS["item_reference"] else "message"
    if not isinstance(kind, str):
        raise invalid_type(f"{param}.type", "a string", kind)
    if kind in ITEM_FIELDS:
        _no_unknown_fields(item, ITEM_FIELDS[kind], param)
    for key in ("id", "created_by"):  # kept as given, and an id is stored as a key: strings only
        if item.get(key) is not None and not isinstance(item[key], str):
            raise invalid_type(f"{param}.{key}", "a string", item[key])
    status = item.get("status")
    if status is not None and status not in ITEM_STATUSES:
        raise invalid(f"Invalid value: {status!r}. Supported values are: 'in_progress', 'completed', and "
                      "'incomplete'.", f"{param}.status", "invalid_value")
    if kind == "message":
        role = item.get("role")
        if role not in ROLES:
            raise invalid(f"Invalid value: {role!r}. Supported values are: 'user', 'assistant', 'system', "
                          "and 'developer'.", f"{param}.role", "invalid_value")
        if "content" not in item:
            raise invalid(f"Missing required parameter: '{param}.content'.", f"{param}.content",
                          "missing_required_parameter")
        content = _normalize_content(item["content"], role, f"{param}.content")
        prefix = "msg"
        normalized = {"type": "message", "id": item.get("id") or new_id(prefix), "role": role,
                      "content": content, "status": item.get("status") or "completed"}
        phase = item.get("phase")
        if phase is not None:
            if phase not in ("commentary", "final_answer"):
                raise invalid(f"Invalid value: {phase!r}. Supported values are: 'commentary' and 'final_answer'.",
                              f"{param}.phase", "invalid_value")
            normalized["phase"] = phase
        return normalized
    if kind in ("function_call", "custom_tool_call"):
        body = "arguments" if kind == "function_call" else "input"
        for key in ("call_id", "name", body):
            if not isinstance(item.get(key), str):
                raise invalid_type(f"{param}.{key}", "a string", item.get(key))
        normalized = {"type": kind, "id": item.get("id") or new_id("fc" if kind == "function_call" else "ctc"),
                      "call_id": item["call_id"], "name": item["name"], body: item[body]}
        if kind == "function_call":  # OpenAI's custom call has no status
            normalized["status"] = item.get("status") or "completed"
        return _with_strings(normalized, item, ("namespace",), param)
    if kind in ("function_call_output", "custom_tool_call_output"):
        if not isinstance(item.get("call_id"), str):
            raise invalid_type(f"{param}.call_id", "a string", item.get("call_id"))
        output = item.get("output")
        if isinstance(output, list):
            output = _normalize_content(output, "user", f"{param}.output")
        elif not isinstance(output, str):
            raise invalid_type(f"{param}.output", "a string or an array of content parts", output)
        normalized = {"type": kind, "id": item.get("id") or new_id("fco" if kind == "function_call_output" else "ctco"),
                      "call_id": item["call_id"], "output": output}
        if kind == "custom_tool_call_output":
            return normalized
        normalized["status"] = item.get("status") or "completed"
        return _with_strings(normalized, item, ("name", "namespace"), param)
    if kind == "reasoning":
        normalized = {"type": "reasoning", "id": item.get("id") or new_id("rs"),
                      "summary": _text_parts(item.get("summary", []), "summary_text", f"{param}.summary")}
        if item.get("content") is not None:
            normalized["content"] = _text_parts(item["content"], "reasoning_text", f"{param}.content")
        encrypted = item.get("encrypted_content")
        if encrypted is not None:
            if not isinstance(encrypted, str):
                raise invalid_type(f"{param}.encrypted_content", "a string", encrypted)
            normalized["encrypted_content"] = encrypted
        return normalized
    if kind == "compaction":
        if not isinstance(item.get("encrypted_content"), str):
            raise invalid_type(f"{param}.encrypted_content", "a string", item.get("encrypted_content"))
        normalized = {"type": "compaction", "id": item.get("id") or new_id("cmp"),
                      "encrypted_content": item["encrypted_content"]}
        if item.get("created_by") is not None:
            normalized["created_by"] = item["created_by"]
        return normalized
    if kind == "compaction_trigger":
        return {"type": "compaction_trigger"}  # validation.py takes it off the input: it asks for compaction
    if kind == "item_reference":
        if not isinstance(item.get("id"), str) or not item["id"]:
            raise invalid_type(f"{param}.id", "a string", item.get("id"))
        return {"type": "item_reference", "id": item["id"]}  # resolved from the store (preparation.py)
    raise invalid(f"Input items of type '{kind}' are not supported by this server. Supported types: "
                  + ", ".join(f"'{t}'" for t in SUPPORTED_ITEM_TYPES) + ".", f"{param}.type", "unsupported_item_type")


def normalize_input(value: Any, param: str = "input") -> list[dict]:
    """Input items as stored (ids given); `param` is where they are in the request (`input`,
    or a conversation's `items`)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "id": new_id("msg"), "role": "user",
                 "content": [_text_part("input_text", value)], "status": "completed"}]
    if not isinstance(value, list):
        raise invalid_type(param, "a string or an array of input items", value)
    items = [_normalize_item(item, f"{param}[{index}]") for index, item in enumerate(value)]
    for index, item in enumerate(items[:-1]):
        if item["type"] == "compaction_trigger":
            raise invalid(f"Invalid '{param}[{index}]': a compaction_trigger must be the final input item.",
                          f"{param}[{index}]", "invalid_value")
    return items


async def resolve_references(store, project: str, items: list[dict], param: str = "input") -> None:
    """Each item_reference in `items` becomes, in place, the stored item it names (this
    project's only): the prompt, and what is stored as input, hold the item itself."""
    for index, item in enumerate(items):
        if item["type"] == "item_reference":
            found = await store.find_item(item["id"], project)
            if found is None:
                raise not_found(f"Item with id '{item['id']}' not found.", f"{param}[{index}].id")
            items[index] = found
