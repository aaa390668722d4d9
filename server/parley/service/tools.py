"""Function tools, tool_choice and text.format: validation, and the Constraint they imply.

Strict mode follows the JSON-schema subset OpenAI documents for Structured Outputs: the root is
an object, every object sets additionalProperties: false and requires all its properties, and
only the listed keywords are allowed. With `strict: true` anything else is a 400 naming the
keyword and its path; a function tool that leaves `strict` out and whose schema is not
strict-compatible is taken as `strict: false` (and echoed so). Either way the output is
constrained to the schema as far as the grammar can express it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from parley.engine.base import Constraint
from parley.errors import ApiError, invalid, invalid_type

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

STRICT_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
    "$defs", "definitions", "$ref", "description", "title", "pattern", "format", "multipleOf", "maximum",
    "exclusiveMaximum", "minimum", "exclusiveMinimum", "minItems", "maxItems",
}
# What a function tool may carry here; others (`output_schema`, `defer_loading`, `allowed_callers`,
# ...) are refused by name rather than ignored.
FUNCTION_TOOL_FIELDS = {"type", "name", "description", "parameters", "strict"}
STRICT_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}
STRICT_MAX_DEPTH = 10


def _check_strict(schema: Any, param: str, depth: int = 0) -> None:
    if not isinstance(schema, dict):
        raise invalid(f"Invalid schema for '{param}': expected an object.", param, "invalid_schema")
    if depth > STRICT_MAX_DEPTH:
        raise invalid(f"Invalid schema for '{param}': strict schemas may nest at most {STRICT_MAX_DEPTH} levels.",
                      param, "invalid_schema")
    for keyword in schema:
        if keyword not in STRICT_KEYWORDS:
            raise invalid(f"Invalid schema for '{param}': '{keyword}' is not supported in strict mode.",
                          f"{param}.{keyword}", "unsupported_schema_keyword")
    types = schema.get("type")
    for name in ([types] if isinstance(types, str) else types or []):
        if name not in STRICT_TYPES:
            raise invalid(f"Invalid schema for '{param}': type '{name}' is not supported.", f"{param}.type",
                          "invalid_schema")
    is_object = types == "object" or (isinstance(types, list) and "object" in types) or "properties" in schema
    if is_object:
        if schema.get("additionalProperties") is not False:
            raise invalid(f"Invalid schema for '{param}': 'additionalProperties' must be false for every object "
                          "in strict mode.", f"{param}.additionalProperties", "invalid_schema")
        properties = schema.get("properties", {})
        missing = sorted(set(properties) - set(schema.get("required", [])))
        if missing:
            raise invalid(f"Invalid schema for '{param}': in strict mode every property must be required; "
                          f"missing {missing}.", f"{param}.required", "invalid_schema")
        for key, child in properties.items():
            _check_strict(child, f"{param}.properties.{key}", depth + 1)
    if "items" in schema:
        _check_strict(schema["items"], f"{param}.items", depth + 1)
    for index, option in enumerate(schema.get("anyOf", [])):
        _check_strict(option, f"{param}.anyOf[{index}]", depth + 1)
    for key in ("$defs", "definitions"):
        for name, child in schema.get(key, {}).items():
            _check_strict(child, f"{param}.{key}.{name}", depth + 1)


def strict_compatible(schema: dict, param: str) -> bool:
    try:
        _check_strict(schema, param)
    except ApiError:
        return False
    return True


def check_root_schema(schema: Any, param: str, strict: bool) -> dict:
    if not isinstance(schema, dict):
        raise invalid(f"Invalid schema for '{param}': expected a JSON schema object.", param, "invalid_schema")
    if schema.get("type") != "object":
        raise invalid(f"Invalid schema for '{param}': the root must have type 'object', got "
                      f"{schema.get('type')!r}.", f"{param}.type", "invalid_schema")
    if strict:
        _check_strict(schema, param)
    return schema


NAMESPACE_TOOL_FIELDS = {"type", "name", "description", "tools"}
CUSTOM_TOOL_FIELDS = {"type", "name", "description", "format"}
# A custom tool's free-form input travels, in the family's call format, as this one argument.
CUSTOM_INPUT = "input"
WEB_SEARCH_TOOL_FIELDS = {"type", "external_web_access", "filters", "search_context_size", "user_location"}


def _function_tool(tool: dict, where: str) -> dict:
    for key in tool:
        if key not in FUNCTION_TOOL_FIELDS:
            raise invalid(f"Unknown parameter: '{where}.{key}'. Function tools take "
                          + ", ".join(sorted(FUNCTION_TOOL_FIELDS)) + ".", f"{where}.{key}", "unknown_parameter")
    name = _tool_name(tool, where)
    strict = tool.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid(f"Invalid type for '{where}.strict': expected a boolean.", f"{where}.strict", "invalid_type")
    parameters = tool.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}, "additionalProperties": False}
    if strict is None:
        # OpenAI defaults function tools to strict; a plain JSON schema (optional properties, no
        # additionalProperties: false) is then taken as non-strict, and the echo says so.
        check_root_schema(parameters, f"{where}.parameters", False)
        strict = strict_compatible(parameters, f"{where}.parameters")
    check_root_schema(parameters, f"{where}.parameters", strict)
    return {"type": "function", "name": name, "description": _description(tool, where), "parameters": parameters,
            "strict": strict}


def _tool_name(tool: dict, where: str) -> str:
    name = tool.get("name")
    if name is None:
        raise invalid(f"Missing required parameter: '{where}.name'.", f"{where}.name", "missing_required_parameter")
    if not isinstance(name, str) or not NAME.match(name):
        raise invalid(f"Invalid '{where}.name': {name!r}. Names are 1-64 characters of a-z, A-Z, 0-9, '_' "
                      "and '-'.", f"{where}.name", "invalid_value")
    return name


def _description(tool: dict, where: str) -> str | None:
    description = tool.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid(f"Invalid type for '{where}.description': expected a string.", f"{where}.description",
                      "invalid_type")
    return description


def _namespace_tool(tool: dict, where: str) -> dict:
    """Function tools grouped under a name (Codex's `multi_agent_v1`): the model sees each one as
    `namespace.name`, and its calls come back with `namespace` set."""
    for key in tool:
        if key not in NAMESPACE_TOOL_FIELDS:
            raise invalid(f"Unknown parameter: '{where}.{key}'.", f"{where}.{key}", "unknown_parameter")
    members = tool.get("tools")
    if not isinstance(members, list) or not members:
        raise invalid(f"Invalid '{where}.tools': expected a non-empty array of function tools.", f"{where}.tools",
                      "invalid_value")
    functions = []
    for index, member in enumerate(members):
        inner = f"{where}.tools[{index}]"
        if not isinstance(member, dict):
            raise invalid(f"Invalid type for '{inner}': expected an object.", inner, "invalid_type")
        if member.get("type") != "function":
            raise invalid(f"A namespace holds function tools only; got {member.get('type')!r}.", f"{inner}.type",
                          "unsupported_tool_type")
        functions.append(_function_tool(member, inner))
    namespace = {"type": "namespace", "name": _tool_name(tool, where), "tools": functions}
    description = _description(tool, where)
    return {**namespace, "description": description} if description is not None else namespace


def _custom_tool(tool: dict, where: str) -> dict:
    """A tool whose input is free text (`format: text`) or text matching a regular expression
    (`format: {"type": "grammar", "syntax": "regex"}`). Lark grammars are refused: this server
    has no Lark-to-GBNF translation."""
    for key in tool:
        if key not in CUSTOM_TOOL_FIELDS:
            raise invalid(f"Unknown parameter: '{where}.{key}'. Custom tools take "
                          + ", ".join(sorted(CUSTOM_TOOL_FIELDS)) + ".", f"{where}.{key}", "unknown_parameter")
    fmt = tool.get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise invalid(f"Invalid type for '{where}.format': expected an object.", f"{where}.format", "invalid_type")
    if fmt.get("type") == "text":
        if set(fmt) != {"type"}:
            raise invalid(f"Unknown parameter in '{where}.format': a text format has only `type`.", f"{where}.format",
                          "unknown_parameter")
    elif fmt.get("type") == "grammar":
        for key in fmt:
            if key not in ("type", "syntax", "definition"):
                raise invalid(f"Unknown parameter: '{where}.format.{key}'.", f"{where}.format.{key}",
                              "unknown_parameter")
        if fmt.get("syntax") != "regex":
            raise invalid(f"Unsupported value: {fmt.get('syntax')!r}. This server enforces custom tool grammars "
                          "written as 'regex'; 'lark' is not supported.", f"{where}.format.syntax", "unsupported_value")
        if not isinstance(fmt.get("definition"), str):
            raise invalid_type(f"{where}.format.definition", "a string", fmt.get("definition"))
    else:
        raise invalid(f"Invalid value: {fmt.get('type')!r}. Supported values are: 'text' and 'grammar'.",
                      f"{where}.format.type", "invalid_value")
    custom = {"type": "custom", "name": _tool_name(tool, where), "format": dict(fmt)}
    description = _description(tool, where)
    return {**custom, "description": description} if description is not None else custom


def _as_function(custom: dict) -> dict:
    """How the model is offered a custom tool: a function of one string, its free-form input."""
    text = {"type": "string"}
    if custom["format"]["type"] == "grammar":
        text["pattern"] = custom["format"]["definition"]
    description = custom.get("description") or ""
    return {"type": "function", "name": custom["name"], "custom": True, "strict": True,
            "description": f"{description} Its input is free-form text, given as `{CUSTOM_INPUT}`.".strip(),
            "parameters": {"type": "object", "properties": {CUSTOM_INPUT: text}, "required": [CUSTOM_INPUT],
                           "additionalProperties": False}}


class CustomInputDecoder:
    """A custom call's input, as the JSON text of its arguments streams in
    (`{"input": "...escaped..."}`): the decoded characters, as soon as they are whole."""

    def __init__(self) -> None:
        self._raw = ""
        self._start: int | None = None  # where the string's characters begin in _raw
        self._done = 0                  # raw characters of the string already decoded
        self.value = ""

    def feed(self, text: str) -> str:
        self._raw += text
        if self._start is None:
            colon = self._raw.find(":")
            quote = self._raw.find('"', colon + 1) if colon >= 0 else -1
            if quote < 0:
                return ""
            self._start = self._done = quote + 1
        end = self._done
        while end < len(self._raw):
            char = self._raw[end]
            if char == '"':
                break
            if char == "\\":
                size = 6 if self._raw[end + 1:end + 2] == "u" else 2
                if size == 6 and self._raw[end + 2:end + 4].lower() in ("d8", "d9", "da", "db") \
                        and self._raw[end + 6:end + 8] in ("\\u", "\\", ""):
                    size = 12  # a high surrogate decodes with the low one that follows it
                if end + size > len(self._raw):
                    break  # an escape still arriving
                end += size
            else:
                end += 1
        piece = json.loads(f'"{self._raw[self._done:end]}"') if end > self._done else ""
        piece = piece.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # a lone surrogate: U+FFFD
        self._done = end
        self.value += piece
        return piece


def _web_search_tool(tool: dict, where: str) -> dict:
    """Parley reaches no web. A search without external access (what Codex sends) is an offline
    search that can find nothing, so it is accepted, echoed, and not offered to the model (a call
    could only return no results); asking for the web is a 400."""
    for key in tool:
        if key not in WEB_SEARCH_TOOL_FIELDS:
            raise invalid(f"Unknown parameter: '{where}.{key}'.", f"{where}.{key}", "unknown_parameter")
    if tool.get("external_web_access") is not False:
        raise invalid("This server has no web access: a web_search tool is accepted only with "
                      "external_web_access: false.", f"{where}.external_web_access", "unsupported_value")
    return dict(tool)


def validate_tools(tools: Any) -> list[dict]:
    """The tools as echoed: function tools, namespaces of them, and offline web search; any other
    tool type is a clear 400. `functions()` flattens them to what the model may call."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("Invalid type for 'tools': expected an array.", "tools", "invalid_type")
    normalized = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise invalid(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
        kind = tool.get("type")
        if kind == "function":
            normalized.append(_function_tool(tool, where))
        elif kind == "namespace":
            normalized.append(_namespace_tool(tool, where))
        elif kind == "custom":
            normalized.append(_custom_tool(tool, where))
        elif kind == "web_search":
            normalized.append(_web_search_tool(tool, where))
        else:
            raise invalid(f"Tools of type {kind!r} are not supported by this server; 'function', 'custom' and "
                          "'namespace' tools are, and 'web_search' without external access.", f"{where}.type",
                          "unsupported_tool_type")
    names = set()
    for index, tool in enumerate(normalized):
        for qualified, where in _names_of(tool, f"tools[{index}]"):
            if qualified in names:
                raise invalid(f"Duplicate function name {qualified!r} in tools.", where, "invalid_value")
            names.add(qualified)
    return normalized


def _names_of(tool: dict, where: str) -> list[tuple[str, str]]:
    """(name the model sees, where the request sets it) of each function in `tool`."""
    if tool["type"] in ("function", "custom"):
        return [(tool["name"], f"{where}.name")]
    if tool["type"] == "namespace":
        return [(f"{tool['name']}.{member['name']}", f"{where}.tools[{index}].name")
                for index, member in enumerate(tool["tools"])]
    return []


def functions(tools: list[dict]) -> list[dict]:
    """The functions the model is offered, flat: a namespace's members named `namespace.name`
    (a function's own name cannot hold a dot, so the two never collide)."""
    flat = []
    for tool in tools:
        if tool["type"] == "function":
            flat.append(tool)
        elif tool["type"] == "custom":
            flat.append(_as_function(tool))
        elif tool["type"] == "namespace":
            flat += [{**member, "name": f"{tool['name']}.{member['name']}",
                      "description": " ".join(filter(None, (tool.get("description"), member["description"])))}
                     for member in tool["tools"]]
    return flat


def split_name(qualified: str) -> tuple[str | None, str]:
    """(namespace, name) of a function name as the model wrote it."""
    namespace, _, name = qualified.rpartition(".")
    return namespace or None, name


def resolve_tool_choice(choice: Any, tools: list[dict]) -> tuple[Any, str, list[dict]]:
    """(echo value, mode none|auto|required, the tools the model may call)."""
    names = {tool["name"] for tool in tools}
    if choice is None:
        return "auto", "auto", tools
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise invalid(f"Invalid value: {choice!r}. Supported values are: 'none', 'auto', and 'required'.",
                          "tool_choice", "invalid_value")
        if choice == "required" and not tools:
            raise invalid("tool_choice 'required' needs at least one tool in 'tools'.", "tool_choice", "invalid_value")
        return choice, choice, tools
    if not isinstance(choice, dict):
        raise invalid("Invalid type for 'tool_choice': expected a string or an object.", "tool_choice", "invalid_type")
    kind = choice.get("type")
    if kind in ("function", "custom"):
        name = choice.get("name")
        if name not in names or bool(next(t for t in tools if t["name"] == name).get("custom")) != (kind == "custom"):
            raise invalid(f"tool_choice names {kind} tool {name!r}, which is not in 'tools'.", "tool_choice.name",
                          "invalid_value")
        return {"type": kind, "name": name}, "required", [t for t in tools if t["name"] == name]
    if kind == "allowed_tools":
        mode = choice.get("mode")
        if mode not in ("auto", "required"):
            raise invalid(f"Invalid value: {mode!r}. Supported values are: 'auto' and 'required'.",
                          "tool_choice.mode", "invalid_value")
        allowed = choice.get("tools")
        if not isinstance(allowed, list) or not allowed:
            raise invalid("tool_choice.tools must be a non-empty array.", "tool_choice.tools", "invalid_value")
        chosen = []
        for index, entry in enumerate(allowed):
            if not isinstance(entry, dict) or entry.get("type") != "function" or entry.get("name") not in names:
                raise invalid(f"tool_choice.tools[{index}] must name a function in 'tools'.",
                              f"tool_choice.tools[{index}]", "invalid_value")
            chosen.append(entry["name"])
        return ({"type": "allowed_tools", "mode": mode, "tools": allowed}, mode,
                [t for t in tools if t["name"] in chosen])
    raise invalid(f"tool_choice of type {kind!r} is not supported by this server.", "tool_choice.type",
                  "unsupported_value")


def validate_text_format(fmt: Any) -> dict:
    if fmt is None:
        return {"type": "text"}
    if not isinstance(fmt, dict):
        raise invalid("Invalid type for 'text.format': expected an object.", "text.format", "invalid_type")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind != "json_schema":
        raise invalid(f"Invalid value: {kind!r}. Supported values are: 'text', 'json_schema', and 'json_object'.",
                      "text.format.type", "invalid_value")
    name = fmt.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise invalid(f"Invalid 'text.format.name': {name!r}. Names are 1-64 characters of a-z, A-Z, 0-9, '_' "
                      "and '-'.", "text.format.name", "invalid_value")
    strict = fmt.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid("Invalid type for 'text.format.strict': expected a boolean.", "text.format.strict",
                      "invalid_type")
    if "schema" not in fmt:
        raise invalid("Missing required parameter: 'text.format.schema'.", "text.format.schema",
                      "missing_required_parameter")
    check_root_schema(fmt["schema"], "text.format.schema", bool(strict))
    normalized = {"type": "json_schema", "name": name, "schema": fmt["schema"], "strict": bool(strict)}
    if fmt.get("description") is not None:
        normalized["description"] = fmt["description"]
    return normalized


def build_constraint(mode: str, callable_tools: list[dict], parallel: bool, fmt: dict,
                     max_calls: int | None = None) -> Constraint | None:
    """With `none` the tools are still shown to the model, so the grammar is what keeps a call
    from being written: text that never opens one (or the answer format's JSON)."""
    answer = fmt.get("schema") if fmt["type"] == "json_schema" else ({"type": "object"} if fmt["type"] == "json_object"
                                                                     else None)
    if callable_tools and mode == "none":
        return Constraint("tools", schema=answer, mode="none")
    if callable_tools:
        return Constraint("tools", schema=answer, mode=mode, parallel=parallel, max_calls=max_calls,
                          tools=tuple((t["name"], t["parameters"]) for t in callable_tools))
    if fmt["type"] == "json_schema":
        return Constraint("json_schema", schema=fmt["schema"])
    if fmt["type"] == "json_object":
        return Constraint("json_object")
    return None


CALLS = ("function_call", "custom_tool_call")
CALL_OUTPUTS = ("function_call_output", "custom_tool_call_output")


def unknown_call_outputs(items: list[dict], start: int = 0) -> ApiError | None:
    """A function_call_output must answer a function_call earlier in the conversation. Items
    before `start` were checked before (a chain's earlier turns): their calls are looked up
    from the newest back, as far as an output needs, so a long chain is not walked every turn."""
    calls: set[str] = set()
    earlier = (items[index] for index in range(start - 1, -1, -1))
    for item in items[start:]:
        if item["type"] in CALLS:
            calls.add(item["call_id"])
        elif item["type"] in CALL_OUTPUTS and item["call_id"] not in calls:
            for before in earlier:
                if before["type"] in CALLS:
                    calls.add(before["call_id"])
                    if before["call_id"] == item["call_id"]:
                        break
            else:
                return invalid(f"No tool call found for function call output with call_id '{item['call_id']}'.",
                               "input", "invalid_call_id")
    return None
