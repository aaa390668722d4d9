"""Validation against the official OpenAI OpenAPI spec, read from ../shared/reference/.

The spec is never copied into the project. A user's clone has no shared/, so the tests that
need it are skipped there with a message saying so; the codec's own tests stand without it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

SPEC_PATH = Path(os.environ.get(
    "PARLEY_OPENAPI_SPEC", Path(__file__).resolve().parents[3] / "shared" / "reference" / "openai-openapi.yaml"))


@functools.lru_cache(maxsize=1)
def _spec():
    import yaml

    try:
        loader = yaml.CSafeLoader
    except AttributeError:
        loader = yaml.SafeLoader
    with open(SPEC_PATH) as handle:
        return yaml.load(handle, Loader=loader)


def _nullable_to_31(node):
    """The spec still uses OpenAPI 3.0's `nullable: true` in places: read it as 'or null'."""
    if isinstance(node, dict):
        node = {key: _nullable_to_31(value) for key, value in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable_to_31(value) for value in node]
    return node


def _allow_documented_nulls(schemas: dict) -> dict:
    """shared/reference/README.md: the spec's own examples print `usage: null` and `user: null`,
    which its schema forbids; OpenAI's API prints them too. Allow exactly those two."""
    user = schemas["ModelResponseProperties"]["properties"]
    user["user"] = {"anyOf": [user["user"], {"type": "null"}]}
    for part in schemas["Response"]["allOf"]:
        if "properties" in part and "usage" in part["properties"]:
            part["properties"]["usage"] = {"anyOf": [part["properties"]["usage"], {"type": "null"}]}
    return schemas


@functools.lru_cache(maxsize=1)
def _registry():
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    schemas = _allow_documented_nulls(_nullable_to_31(_spec()["components"]["schemas"]))
    document = {"components": {"schemas": schemas}}
    return Registry().with_resource("urn:openai", Resource.from_contents(document, default_specification=DRAFT202012))


def require_spec() -> None:
    if not SPEC_PATH.is_file():
        pytest.skip(f"OpenAI OpenAPI spec not found at {SPEC_PATH} (it lives in the developers' shared/ "
                    "folder, not in the project); schema conformance not checked here")


def validate(schema_name: str, document) -> None:
    """Raise jsonschema.ValidationError if `document` does not match components/schemas/<name>."""
    import jsonschema

    require_spec()
    validator = jsonschema.Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{schema_name}"},
                                                registry=_registry())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise AssertionError(f"{schema_name}: {best.message} at {list(best.absolute_path)}")


# -- the Open Responses spec ------------------------------------------------------------------

OPEN_RESPONSES_PATH = SPEC_PATH.parent / "open-responses" / "openapi.json"


def require_open_responses() -> None:
    if not OPEN_RESPONSES_PATH.is_file():
        pytest.skip(f"Open Responses OpenAPI document not found at {OPEN_RESPONSES_PATH} (it lives in the "
                    "developers' shared/ folder, not in the project); Open Responses conformance not checked here")


@functools.lru_cache(maxsize=1)
def _open_responses():
    import json

    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    schemas = json.loads(OPEN_RESPONSES_PATH.read_text())["components"]["schemas"]
    document = {"components": {"schemas": _nullable_to_31(schemas)}}
    registry = Registry().with_resource("urn:open-responses",
                                        Resource.from_contents(document, default_specification=DRAFT202012))
    return schemas, registry


def open_responses_event_schema(event_type: str) -> str | None:
    """The Open Responses schema of a stream event, by its `type` constant; None for events it
    names differently (OpenAI's `response.reasoning_text.*`, Parley's default) or not at all."""
    schemas, _ = _open_responses()
    for name, schema in schemas.items():
        kind = (schema.get("properties") or {}).get("type") or {}
        if name.endswith("StreamingEvent") and (kind.get("enum") == [event_type] or kind.get("const") == event_type):
            return name
    return None


def validate_open_responses(schema_name: str, document) -> None:
    """Raise AssertionError if `document` does not match the Open Responses schema `schema_name`."""
    import jsonschema

    require_open_responses()
    _, registry = _open_responses()
    validator = jsonschema.Draft202012Validator({"$ref": f"urn:open-responses#/components/schemas/{schema_name}"},
                                                registry=registry)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise AssertionError(f"Open Responses {schema_name}: {best.message} at {list(best.absolute_path)}")
