"""Every field and `type` value the OpenAI spec defines has a typed home in parley.v1."""

import pytest
from parley.service.validation import REST_ONLY_FIELDS
from parley.v1 import events_pb2, items_pb2, responses_pb2, service_pb2

from tests.support import openapi

MESSAGES = {
    "CreateResponse": responses_pb2.CreateResponseRequest, "Response": responses_pb2.Response,
    "OutputMessage": items_pb2.Message, "EasyInputMessage": items_pb2.Message,
    "FunctionToolCall": items_pb2.FunctionCall, "FunctionCallOutputItemParam": items_pb2.FunctionCallOutput,
    "ReasoningItem": items_pb2.ReasoningItem, "FunctionTool": items_pb2.FunctionTool,
    "CustomToolParam": items_pb2.CustomTool, "CustomToolCall": items_pb2.CustomToolCall,
    "OutputTextContent": items_pb2.OutputTextContent, "InputTextContent": items_pb2.InputTextContent,
    "InputImageContent": items_pb2.InputImageContent, "InputFileContent": items_pb2.InputFileContent,
    "LogProb": items_pb2.LogProb, "ToolChoiceAllowed": items_pb2.ToolChoiceAllowed,
    "ResponseUsage": responses_pb2.Usage, "Reasoning": responses_pb2.ReasoningConfig,
    "TextResponseFormatJsonSchema": responses_pb2.TextFormatJsonSchema, "Model": responses_pb2.Model,
    "ResponseTextDeltaEvent": events_pb2.TextDeltaEvent, "ResponseErrorEvent": events_pb2.ErrorEvent,
    "ResponseFunctionCallArgumentsDoneEvent": events_pb2.FunctionCallArgumentsDoneEvent,
    "ResponseReasoningSummaryPartDoneEvent": events_pb2.ReasoningSummaryPartEvent,
    "ResponseOutputTextAnnotationAddedEvent": events_pb2.AnnotationAddedEvent,
    "ResponseItemList": service_pb2.ListInputItemsResponse,
}
# Fields only the REST body carries: the typed API says the same thing by its choice of RPC.
REST_ONLY = {"CreateResponse": REST_ONLY_FIELDS}
UNIONS = {
    "ResponseStreamEvent": events_pb2.ResponseStreamEvent, "OutputItem": items_pb2.Item, "Item": items_pb2.Item,
    "ItemResource": items_pb2.Item, "InputItem": items_pb2.Item, "Tool": items_pb2.Tool,
    "ToolChoiceParam": items_pb2.ToolChoiceObject, "Annotation": items_pb2.Annotation,
    "InputContent": items_pb2.InputContent, "TextResponseFormatConfiguration": responses_pb2.TextFormat,
}


@pytest.fixture(scope="module")
def schemas():
    openapi.require_spec()
    return openapi._spec()["components"]["schemas"]


def properties(schemas, name) -> set[str]:
    schema, found = schemas[name], set()
    for part in schema.get("allOf", [schema]):
        if "$ref" in part:
            found |= properties(schemas, part["$ref"].split("/")[-1])
        found |= set(part.get("properties", {}))
    return found


def type_values(schemas, name) -> set[str]:
    schema, found = schemas[name], set()
    for part in schema.get("allOf", [schema]):
        if "$ref" in part:
            found |= type_values(schemas, part["$ref"].split("/")[-1])
        kind = part.get("properties", {}).get("type", {})
        for option in [kind, *kind.get("anyOf", []), *kind.get("oneOf", [])]:
            found |= set(option.get("enum", []))
    return found


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_every_spec_property_has_a_field(schemas, name):
    descriptor = MESSAGES[name].DESCRIPTOR
    homes = set(descriptor.fields_by_name) | {oneof.name for oneof in descriptor.oneofs} | {"type"}
    assert properties(schemas, name) - homes - REST_ONLY.get(name, set()) == set()


@pytest.mark.parametrize("name", sorted(UNIONS))
def test_every_spec_type_value_has_a_variant(schemas, name):
    union = schemas[name]
    members = [ref["$ref"].split("/")[-1] for key in ("anyOf", "oneOf") for ref in union.get(key, []) if "$ref" in ref]
    wanted = set().union(*(type_values(schemas, member) for member in members))
    variants = {field.json_name for field in UNIONS[name].DESCRIPTOR.oneofs_by_name["type"].fields}
    assert wanted - variants == set()
