"""The typed mirror: OpenAI JSON (Python dicts) <-> parley.v1 protobuf messages.

The conversion is generic, driven by the proto's conventions (see items.proto's header):
field names are JSON keys, `oneof type` unions carry the OpenAI `type` value as the variant's
json_name, `oneof value` messages are "string or array/object" unions, `*List` wrappers are
JSON arrays, Struct/Value are free JSON. Only codec/ and transport/ import generated code.
"""

from __future__ import annotations

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from parley.errors import ApiError, invalid

_STRUCT_TYPES = ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue")


def _real_oneofs(descriptor: Descriptor):
    for oneof in descriptor.oneofs:
        if not (len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name):
            yield oneof


def _is_list_wrapper(descriptor: Descriptor) -> bool:
    return descriptor.name.endswith("List") and [f.name for f in descriptor.fields] == ["items"]


# -- proto -> JSON ------------------------------------------------------------------------------

def to_json(message: Message):
    descriptor = message.DESCRIPTOR
    if descriptor.full_name in _STRUCT_TYPES:
        return json_format.MessageToDict(message)
    if _is_list_wrapper(descriptor):
        return [_value_to_json(descriptor.fields[0], v) for v in message.items]
    oneofs = list(_real_oneofs(descriptor))
    if len(oneofs) == 1 and oneofs[0].name == "value" and len(descriptor.fields) == len(oneofs[0].fields):
        which = message.WhichOneof("value")
        return None if which is None else _value_to_json(descriptor.fields_by_name[which], getattr(message, which))
    out: dict = {}
    union_fields = set()
    for oneof in oneofs:
        union_fields.update(f.name for f in oneof.fields)
        which = message.WhichOneof(oneof.name)
        if which is None:
            continue
        field = descriptor.fields_by_name[which]
        if oneof.name == "type":
            out["type"] = field.json_name
            variant = getattr(message, which)
            if field.message_type.name in ("HostedToolItem", "HostedTool", "HostedToolStreamEvent"):
                body = to_json(variant)
                out.update(body.pop("fields", {}) or {})
                out.update(body)
            else:
                out.update(to_json(variant))
        else:
            out[oneof.name] = _value_to_json(field, getattr(message, which))
    for field in descriptor.fields:
        if field.name in union_fields:
            continue
        value = getattr(message, field.name)
        if field.is_repeated:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                out[field.name] = {k: _value_to_json(field.message_type.fields_by_name["value"], v)
                                   for k, v in value.items()}
            else:
                out[field.name] = [_value_to_json(field, v) for v in value]
        elif field.message_type is not None or field.has_presence:
            if message.HasField(field.name):
                out[field.name] = _value_to_json(field, value)
        else:
            out[field.name] = value
    return out


def _value_to_json(field: FieldDescriptor, value):
    if field.message_type is not None:
        return to_json(value)
    return value


# -- JSON -> proto ------------------------------------------------------------------------------

def from_json(data, message: Message, path: str = "") -> Message:
    """Fill `message` from OpenAI JSON; a key with no typed home is an error naming its path."""
    descriptor = message.DESCRIPTOR
    if descriptor.full_name in _STRUCT_TYPES:
        json_format.ParseDict(data, message)
        return message
    if _is_list_wrapper(descriptor):
        field = descriptor.fields[0]
        for index, element in enumerate(_expect(data, list, path)):
            _append(message.items, field, element, f"{path}[{index}]")
        return message
    oneofs = list(_real_oneofs(descriptor))
    if len(oneofs) == 1 and oneofs[0].name == "value" and len(descriptor.fields) == len(oneofs[0].fields):
        # Several variants may take the same JSON shape (input vs output parts): first that fits.
        failure = None
        for field in oneofs[0].fields:
            if _matches(field, data):
                try:
                    _set(message, field, data, path)
                    return message
                except ApiError as error:
                    message.ClearField(field.name)
                    failure = failure or error
        raise failure or invalid(f"Invalid type for '{path}'.", path or None, "invalid_type")
    data = _expect(data, dict, path)
    type_union = next((o for o in oneofs if o.name == "type"), None)
    remaining = dict(data)
    if type_union is not None:
        kind = remaining.pop("type", None)
        variants = {f.json_name: f for f in type_union.fields}
        if kind is None and "message" in variants and "role" in remaining:
            kind = "message"  # OpenAI's EasyInputMessage may omit `type`
        field = variants.get(kind)
        if field is None:
            raise invalid(f"Invalid value for '{_join(path, 'type')}': {kind!r}.", _join(path, "type"),
                          "invalid_value")
        variant = getattr(message, field.name)
        variant.SetInParent()
        if field.message_type.name in ("HostedToolItem", "HostedTool", "HostedToolStreamEvent"):
            own = {k: remaining.pop(k) for k in list(remaining) if k in field.message_type.fields_by_name and k != "fields"}
            from_json(own, variant, path)
            if remaining:
                variant.fields.update(remaining)
        else:
            from_json(remaining, variant, path)
        return message
    for key, value in remaining.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            raise invalid(f"Unknown parameter: '{_join(path, key)}'.", _join(path, key), "unknown_parameter")
        if value is None:
            continue
        _set(message, field, value, _join(path, key))
    return message


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _matches(field: FieldDescriptor, value) -> bool:
    if field.message_type is None:
        return isinstance(value, str) if field.type == FieldDescriptor.TYPE_STRING else not isinstance(value, (dict, list))
    if _is_list_wrapper(field.message_type):
        return isinstance(value, list)
    return isinstance(value, dict)


def _expect(value, kind, path):
    if not isinstance(value, kind):
        expected = "an object" if kind is dict else "an array"
        raise invalid(f"Invalid type for '{path}': expected {expected}.", path or None, "invalid_type")
    return value


def _set(message: Message, field: FieldDescriptor, value, path: str) -> None:
    if field.is_repeated:
        container = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for k, v in _expect(value, dict, path).items():
                container[k] = v
            return
        for index, element in enumerate(_expect(value, list, path)):
            _append(container, field, element, f"{path}[{index}]")
        return
    if field.message_type is not None:
        child = getattr(message, field.name)
        child.SetInParent()
        from_json(value, child, path)
        return
    try:
        setattr(message, field.name, value)
    except (TypeError, ValueError):
        raise invalid(f"Invalid type for '{path}'.", path, "invalid_type") from None


def _append(container, field: FieldDescriptor, element, path: str) -> None:
    if field.message_type is None:
        try:
            container.append(element)
        except (TypeError, ValueError):
            raise invalid(f"Invalid type for '{path}'.", path, "invalid_type") from None
    elif field.message_type.full_name == "google.protobuf.Struct":
        container.add().update(_expect(element, dict, path))
    elif field.message_type.full_name == "google.protobuf.Value":
        json_format.ParseDict(element, container.add())
    else:
        from_json(element, container.add(), path)


def session_events(events: list[dict], stream_id: str | None) -> list[Message]:
    """A session's outgoing events (stream events, or an error envelope) as SessionEvents."""
    from parley.v1 import events_pb2, service_pb2

    lane = {} if stream_id is None else {"stream_id": stream_id}
    messages = []
    for event in events:
        if event["type"] == "error" and "error" in event:  # the envelope (service/sessions.py)
            details = {key: value for key, value in event["error"].items() if value is not None}
            error = service_pb2.SessionError(status=event["status"], sequence_number=event.get("sequence_number"),
                                             **details)
            messages.append(service_pb2.SessionEvent(error=error, **lane))
        else:
            messages.append(service_pb2.SessionEvent(event=from_json(event, events_pb2.ResponseStreamEvent()),
                                                     **lane))
    return messages
