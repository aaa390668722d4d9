"""Validation of a create request (OpenAI JSON, already decoded) into CreateParams.

Every rejection is an ApiError whose `param` names the offending field the way OpenAI does
(`input[2].content[0].type`, `metadata`, `tools[0].type`). Fields whose behaviour Parley does
not implement yet are rejected with a 400 that says so; none is silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from parley.engine.base import SamplingParams
from parley.errors import ApiError, ErrorKind, invalid, invalid_type
from parley.service.input_items import normalize_input
from parley.service.tools import build_constraint, functions, resolve_tool_choice, validate_text_format, validate_tools

INCLUDE_VALUES = frozenset({
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
})

# Only the REST body carries these; the typed API chooses streaming by RPC.
REST_ONLY_FIELDS = frozenset({"stream", "stream_options"})
# The typed CreateResponseRequest's fields plus REST_ONLY_FIELDS (a test holds them equal).
KNOWN_FIELDS = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "top_logprobs",
    "metadata", "store", "background", "previous_response_id", "tools",
    "tool_choice", "text", "reasoning", "include", "parallel_tool_calls", "truncation", "user",
    "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier",
    "max_tool_calls", "prompt", "conversation", "prompt_cache_options", "context_management",
    "moderation", "presence_penalty", "frequency_penalty", "client_metadata",
}) | REST_ONLY_FIELDS
NOT_YET = {
    "prompt": "Prompt templates are not implemented in this Parley release.",
    "moderation": "Moderation is not available in this Parley release.",
    "prompt_cache_options": "prompt_cache_options is not implemented in this Parley release.",
}
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")


@dataclasses.dataclass(frozen=True)
class CreateParams:
    model: str
    input_items: list[dict]  # normalized to stored item form, each with an id
    instructions: str | None
    max_output_tokens: int | None
    temperature: float
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    top_logprobs: int | None
    metadata: dict[str, str]
    store: bool
    stream: bool
    background: bool
    previous_response_id: str | None
    include: list[str]
    parallel_tool_calls: bool
    truncation: str
    tools: list[dict]           # as echoed: functions, namespaces, offline web search
    functions: list[dict]       # what the model is offered, flat (namespaced names `ns.name`)
    tool_choice: Any
    tool_mode: str              # none | auto | required
    callable_tools: list[dict]  # the tools the model may call under tool_choice
    text: dict
    reasoning: dict | None
    echo: dict  # fields echoed verbatim into the Response (user, service_tier, ...)
    conversation_id: str | None = None  # the conversation whose items come first and that this response joins
    compact: bool = False  # the input ended with a compaction_trigger: the output is a compaction item
    compact_threshold: int | None = None  # context_management: compact first when the prompt is longer
    obfuscate: bool = True  # stream_options.include_obfuscation: pad streamed deltas (OpenAI's default)
    client_metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # kept with the response (Codex)

    @property
    def effort(self) -> str | None:
        """The reasoning effort asked for, if any (validated: one the served model's prompt sets)."""
        return (self.reasoning or {}).get("effort")

    @property
    def reasoning_turns(self) -> str:
        """Which reasoning items reach the prompt: `all_turns` (Parley's `auto`) or `current_turn`."""
        return "current_turn" if (self.reasoning or {}).get("context") == "current_turn" else "all_turns"

    @property
    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in self.include

    def sampling(self, max_tokens: int) -> SamplingParams:
        """This request lowered to the engine's terms; `max_tokens` is already fitted to the window.
        A compaction run writes a free-text summary: no tool call, no answer format."""
        if self.compact:
            return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                                  presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            constraint=build_constraint(self.tool_mode, self.callable_tools, self.parallel_tool_calls,
                                        self.text["format"], self.echo["max_tool_calls"]),
            top_logprobs=(self.top_logprobs or 0) if self.wants_logprobs else None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(body: dict, key: str, check, expected: str):
    value = body.get(key)
    if value is None:
        return None
    if not check(value):
        raise invalid_type(key, expected, value)
    return value


def _range(param: str, value, low, high) -> None:
    if value is not None and not (low <= value <= high):
        raise invalid(f"Invalid '{param}': {value} is out of range; expected a value between {low} and {high}.",
                      param, "invalid_value" if param != "top_logprobs" else "integer_out_of_range")


# Codex's client_metadata carries its turn metadata as a JSON string of about 800 characters.
CLIENT_METADATA_MAX_VALUE = 4096


def validate_string_map(metadata: Any, param: str, max_value: int = 512) -> dict[str, str]:
    """OpenAI's metadata rules: at most 16 string values, keys of at most 64 characters, values of
    at most 512 (`max_value`)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise invalid_type(param, "an object", metadata)
    if len(metadata) > 16:
        raise invalid(f"Invalid '{param}': too many properties. Expected at most 16, got {len(metadata)}.",
                      param, "object_above_max_properties")
    for key, value in metadata.items():
        if len(key) > 64:
            raise invalid(f"Invalid '{param}': key '{key[:20]}...' is longer than 64 characters.",
                          param, "invalid_value")
        if not isinstance(value, str):
            raise invalid_type(f"{param}.{key}", "a string", value)
        if len(value) > max_value:
            raise invalid(f"Invalid '{param}.{key}': string too long. Expected at most {max_value} characters, "
                          f"got {len(value)}.", f"{param}.{key}", "string_above_max_length")
    return dict(metadata)


def _validate_stream_options(options: dict) -> bool:
    """Whether streamed deltas carry `obfuscation` padding (true unless the client says no)."""
    for key in options:
        if key != "include_obfuscation":
            raise invalid(f"Unknown parameter: 'stream_options.{key}'.", f"stream_options.{key}", "unknown_parameter")
    obfuscate = options.get("include_obfuscation")
    if obfuscate is not None and not isinstance(obfuscate, bool):
        raise invalid_type("stream_options.include_obfuscation", "a boolean", obfuscate)
    return obfuscate is not False


def _validate_context_management(value: Any) -> int | None:
    """`context_management`: at most one `{"type": "compaction", "compact_threshold": N}` (N >= 1000
    prompt tokens; unset: when the prompt would not fit the model's window)."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise invalid_type("context_management", "an array", value)
    threshold = None
    for index, entry in enumerate(value):
        where = f"context_management[{index}]"
        if not isinstance(entry, dict):
            raise invalid_type(where, "an object", entry)
        for key in entry:
            if key not in ("type", "compact_threshold"):
                raise invalid(f"Unknown parameter: '{where}.{key}'.", f"{where}.{key}", "unknown_parameter")
        if entry.get("type") != "compaction":
            raise invalid(f"Invalid value: {entry.get('type')!r}. Supported values are: 'compaction'.",
                          f"{where}.type", "invalid_value")
        if index:
            raise invalid("context_management takes one compaction entry.", where, "invalid_value")
        threshold = entry.get("compact_threshold")
        if threshold is not None and not (_is_int(threshold) and threshold >= 1000):
            raise invalid(f"Invalid '{where}.compact_threshold': expected an integer >= 1000.",
                          f"{where}.compact_threshold", "invalid_value")
        threshold = threshold or 0  # 0: compact only when the prompt would not fit
    return threshold


def _validate_conversation(value: Any) -> str | None:
    """`conversation`: an id, or `{"id": ...}`."""
    if value is None:
        return None
    param = "conversation"
    if isinstance(value, dict):
        for key in value:
            if key != "id":
                raise invalid(f"Unknown parameter: 'conversation.{key}'.", f"conversation.{key}", "unknown_parameter")
        value, param = value.get("id"), "conversation.id"
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    if not value.startswith("conv_"):
        raise invalid(f"Invalid '{param}': '{value[:64]}'. Expected an ID that begins with 'conv'.", param,
                      "invalid_value")
    return value


def check_body(body: Any, allowed: frozenset[str] | set[str]) -> dict:
    """A JSON body that is an object of `allowed` keys (a 400 names the first key that is not)."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", None, "invalid_body")
    for key in body:
        if key not in allowed:
            raise invalid(f"Unknown parameter: '{key}'.", key, "unknown_parameter")
    return body


def page_bounds(limit: int | None, order: str | None) -> tuple[int, str]:
    """A list route's `limit` (1..100, default 20) and `order` (`asc` or `desc`, the default)."""
    limit = 20 if limit is None else limit
    if not 1 <= limit <= 100:
        raise invalid(f"Invalid 'limit': {limit}. Expected a value between 1 and 100.", "limit", "invalid_value")
    order = order or "desc"
    if order not in ("asc", "desc"):
        raise invalid(f"Invalid 'order': {order!r}. Supported values are: 'asc' and 'desc'.", "order",
                      "invalid_value")
    return limit, order


def item_list(items: list[dict], has_more: bool = False) -> dict:
    """A page of items as OpenAI lists them. Its schemas make first_id and last_id required
    strings, so an empty page has empty ones."""
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else "",
            "last_id": items[-1]["id"] if items else "", "has_more": has_more}


def validate_include(values: Any, param: str = "include") -> list[str]:
    """`include` values, each one OpenAI documents (a 400 names the first that is not)."""
    if values is None:
        return []
    if not isinstance(values, list):
        raise invalid_type(param, "an array", values)
    for index, value in enumerate(values):
        if not isinstance(value, str) or value not in INCLUDE_VALUES:
            raise invalid(f"Invalid value: {value!r}. Supported values are: "
                          + ", ".join(f"'{v}'" for v in sorted(INCLUDE_VALUES)) + ".",
                          f"{param}[{index}]", "invalid_value")
    return list(values)


def _validate_text(text: Any) -> dict:
    if text is None:
        return {"format": {"type": "text"}, "verbosity": "medium"}
    if not isinstance(text, dict):
        raise invalid_type("text", "an object", text)
    verbosity = text.get("verbosity") or "medium"
    if verbosity not in ("low", "medium", "high"):
        raise invalid(f"Invalid value: {verbosity!r}. Supported values are: 'low', 'medium', and 'high'.",
                      "text.verbosity", "invalid_value")
    return {"format": validate_text_format(text.get("format")), "verbosity": verbosity}


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
# The efforts that ask for what the served model does anyway: a model without reasoning reasons
# not at all ("none"); a reasoning family reasons as its template makes it, OpenAI's default
# ("medium"). Parley cannot set a reasoning budget, so any other effort is refused.
NATURAL_EFFORT = {False: "none", True: "medium"}


def _validate_reasoning(reasoning: Any, reasoning_model: bool, efforts: tuple[str, ...] = ()) -> dict | None:
    """`efforts`: what the served model's prompt can ask for besides its natural effort (gpt-oss's
    system message sets low, medium or high)."""
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise invalid_type("reasoning", "an object", reasoning)
    for key in reasoning:
        if key not in ("effort", "summary", "generate_summary", "mode", "context"):
            raise invalid(f"Unknown parameter: 'reasoning.{key}'.", f"reasoning.{key}", "unknown_parameter")
    effort = reasoning.get("effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise invalid(f"Invalid value: {effort!r}. Supported values are: 'none', 'minimal', 'low', 'medium', "
                      "'high', and 'xhigh'.", "reasoning.effort", "invalid_value")
    if effort is not None and effort != NATURAL_EFFORT[reasoning_model] and effort not in efforts:
        taken = [one for one in REASONING_EFFORTS if one == NATURAL_EFFORT[reasoning_model] or one in efforts]
        what = (f"it takes {', '.join(repr(one) for one in taken)}" if efforts else
                "the served model reasons as its chat template makes it, which is effort 'medium'"
                if reasoning_model else "the served model does not reason")
        raise invalid(f"Unsupported value: 'reasoning.effort' {effort!r} is not supported with this model: {what}.",
                      "reasoning.effort", "unsupported_value")
    for key in ("summary", "generate_summary"):  # generate_summary: OpenAI's deprecated name
        summary = reasoning.get(key)
        if summary is not None and summary not in ("auto", "concise", "detailed"):
            raise invalid(f"Invalid value: {summary!r}. Supported values are: 'auto', 'concise', and 'detailed'.",
                          f"reasoning.{key}", "invalid_value")
        # `auto` lets the server choose: with no summariser here, it chooses none (what Codex
        # asks of every model). A summary asked for by name would have to be faked: refused.
        if summary in ("concise", "detailed"):
            raise invalid(f"Reasoning summaries are not available on this server; 'reasoning.{key}' {summary!r} "
                          "cannot be honoured. Leave it out or use 'auto'.", f"reasoning.{key}", "unsupported_value")
    echo = {"effort": effort, "summary": None}
    mode = reasoning.get("mode")
    if mode is not None:  # `standard` is how every model here runs; there is no `pro`
        if mode != "standard":
            raise invalid(f"Unsupported value: 'reasoning.mode' {mode!r} is not supported with this model; the only "
                          "mode is 'standard'.", "reasoning.mode", "unsupported_value")
        echo["mode"] = mode
    context = reasoning.get("context")
    if context is not None:  # which earlier reasoning items the prompt shows (conversation.py)
        if context not in ("auto", "current_turn", "all_turns"):
            raise invalid(f"Invalid value: {context!r}. Supported values are: 'auto', 'current_turn', and "
                          "'all_turns'.", "reasoning.context", "invalid_value")
        echo["context"] = context
    return echo


def validate_create(body: Any, served_models: list[str], *, reasoning_model: bool = False,
                    efforts: tuple[str, ...] = ()) -> CreateParams:
    check_body(body, KNOWN_FIELDS)
    for key, message in NOT_YET.items():
        # `"prompt": {}` asks for a prompt too; an empty list asks for nothing (the typed API
        # cannot tell an empty repeated field from an absent one).
        if body.get(key) not in (None, []):
            raise invalid(message, key, "unsupported_parameter")

    model = body.get("model")
    if model is None:
        raise invalid("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise invalid_type("model", "a string", model)
    if model not in served_models:
        raise ApiError(ErrorKind.NOT_FOUND, f"The model '{model}' does not exist. Served models: "
                       + ", ".join(served_models) + ".", "model", "model_not_found")

    temperature = _optional(body, "temperature", _is_number, "a number")
    _range("temperature", temperature, 0, 2)
    top_p = _optional(body, "top_p", _is_number, "a number")
    _range("top_p", top_p, 0, 1)
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        penalties[name] = _optional(body, name, _is_number, "a number")
        _range(name, penalties[name], -2, 2)
    max_output_tokens = _optional(body, "max_output_tokens", _is_int, "an integer")
    if max_output_tokens is not None and max_output_tokens < 16:
        raise invalid(f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16, "
                      f"but got {max_output_tokens} instead.", "max_output_tokens", "integer_below_min_value")
    top_logprobs = _optional(body, "top_logprobs", _is_int, "an integer")
    _range("top_logprobs", top_logprobs, 0, 20)

    include = validate_include(body.get("include"))

    booleans = {}
    for key, default in (("store", True), ("stream", False), ("parallel_tool_calls", True), ("background", False)):
        value = _optional(body, key, lambda v: isinstance(v, bool), "a boolean")
        booleans[key] = default if value is None else value

    if booleans["background"] and not booleans["store"]:
        raise invalid("Background responses must be stored: background=true requires store=true.", "store",
                      "invalid_value")

    truncation = _optional(body, "truncation", lambda v: isinstance(v, str), "a string") or "disabled"
    if truncation not in ("auto", "disabled"):
        raise invalid(f"Invalid value: {truncation!r}. Supported values are: 'auto' and 'disabled'.",
                      "truncation", "invalid_value")

    instructions = _optional(body, "instructions", lambda v: isinstance(v, str), "a string")
    previous = _optional(body, "previous_response_id", lambda v: isinstance(v, str), "a string")
    if previous is not None and not previous.startswith("resp_"):
        raise invalid(f"Invalid 'previous_response_id': '{previous}'. Expected an ID that begins with 'resp'.",
                      "previous_response_id", "invalid_value")

    echo = {}
    for key in ("user", "prompt_cache_key"):
        echo[key] = _optional(body, key, lambda v: isinstance(v, str), "a string")
    safety = _optional(body, "safety_identifier", lambda v: isinstance(v, str), "a string")
    if safety is not None and len(safety) > 64:
        raise invalid("Invalid 'safety_identifier': string too long. Expected at most 64 characters.",
                      "safety_identifier", "string_above_max_length")
    echo["safety_identifier"] = safety
    retention = _optional(body, "prompt_cache_retention", lambda v: isinstance(v, str), "a string")
    if retention is not None and retention not in ("in_memory", "24h"):
        raise invalid(f"Invalid value: {retention!r}. Supported values are: 'in_memory' and '24h'.",
                      "prompt_cache_retention", "invalid_value")
    echo["prompt_cache_retention"] = retention
    tier = _optional(body, "service_tier", lambda v: isinstance(v, str), "a string")
    if tier is not None and tier not in SERVICE_TIERS:
        raise invalid(f"Invalid value: {tier!r}. Supported values are: "
                      + ", ".join(f"'{t}'" for t in SERVICE_TIERS) + ".", "service_tier", "invalid_value")
    # One tier serves every request here; like OpenAI, the response says the tier actually used.
    echo["service_tier"] = "default"
    max_tool_calls = _optional(body, "max_tool_calls", _is_int, "an integer")
    if max_tool_calls is not None and max_tool_calls < 1:
        raise invalid("Invalid 'max_tool_calls': expected a value >= 1.", "max_tool_calls", "invalid_value")
    echo["max_tool_calls"] = max_tool_calls
    options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    if options is not None and not booleans["stream"]:
        raise invalid("stream_options is only allowed when 'stream' is true.", "stream_options", "invalid_value")
    obfuscate = _validate_stream_options(options or {})

    conversation_id = _validate_conversation(body.get("conversation"))
    if conversation_id is not None and previous is not None:
        raise invalid("previous_response_id and conversation cannot both be set: a response continues either a "
                      "response chain or a conversation.", "conversation", "invalid_value")
    if conversation_id is not None and not booleans["store"]:
        raise invalid("A response in a conversation must be stored: conversation requires store=true.", "store",
                      "invalid_value")

    tools = validate_tools(body.get("tools"))
    offered = functions(tools)
    tool_choice, tool_mode, callable_tools = resolve_tool_choice(body.get("tool_choice"), offered)
    input_items = normalize_input(body.get("input"))
    compact = bool(input_items) and input_items[-1]["type"] == "compaction_trigger"
    if compact:
        input_items.pop()
        for key in ("text", "tool_choice", "include", "top_logprobs", "context_management"):
            if body.get(key) not in (None, [], {}) and not (key == "tool_choice" and body[key] == "auto"):
                raise invalid(f"'{key}' does not apply to a compaction run (the input ends with a "
                              "compaction_trigger): its output is a compaction item.", key, "invalid_value")
    if not input_items and previous is None and conversation_id is None:
        raise invalid("Missing required parameter: 'input'.", "input", "missing_required_parameter")

    return CreateParams(
        model=model,
        input_items=input_items,
        instructions=instructions,
        max_output_tokens=max_output_tokens,
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        presence_penalty=float(penalties["presence_penalty"] or 0),
        frequency_penalty=float(penalties["frequency_penalty"] or 0),
        top_logprobs=top_logprobs,
        metadata=validate_string_map(body.get("metadata"), "metadata"),
        store=booleans["store"],
        stream=booleans["stream"],
        background=booleans["background"],
        previous_response_id=previous,
        include=include,
        parallel_tool_calls=booleans["parallel_tool_calls"],
        truncation=truncation,
        tools=tools,
        functions=offered,
        tool_choice=tool_choice,
        tool_mode=tool_mode,
        callable_tools=callable_tools,
        text=_validate_text(body.get("text")),
        reasoning=_validate_reasoning(body.get("reasoning"), reasoning_model, efforts),
        echo=echo,
        obfuscate=obfuscate,
        conversation_id=conversation_id,
        compact=compact,
        compact_threshold=_validate_context_management(body.get("context_management")),
        client_metadata=validate_string_map(body.get("client_metadata"), "client_metadata",
                                            max_value=CLIENT_METADATA_MAX_VALUE),
    )
