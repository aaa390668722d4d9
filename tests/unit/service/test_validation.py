import pytest
from parley.errors import ApiError
from parley.service.validation import validate_create

MODEL = "m"
OBJ = {"type": "object", "properties": {}, "additionalProperties": False}
FN = {"type": "function", "name": "f", "parameters": OBJ}


def create(**body):
    return validate_create({"model": MODEL, **body}, [MODEL])


def rejected(body) -> ApiError:
    with pytest.raises(ApiError) as info:
        validate_create(body, [MODEL])
    return info.value


def test_string_input_becomes_one_user_message():
    params = create(input="hello")
    [item] = params.input_items
    assert item["type"] == "message" and item["role"] == "user" and item["status"] == "completed"
    assert item["content"] == [{"type": "input_text", "text": "hello"}]
    assert item["id"].startswith("msg_")


def test_message_list_with_every_role_and_content_form():
    params = create(input=[
        {"role": "system", "content": "s"},
        {"role": "developer", "content": [{"type": "input_text", "text": "d"}]},
        {"type": "message", "role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ])
    roles = [item["role"] for item in params.input_items]
    assert roles == ["system", "developer", "user", "assistant"]
    assert params.input_items[3]["content"] == [{"type": "output_text", "text": "a", "annotations": [], "logprobs": []}]


def test_defaults():
    params = create(input="x")
    assert (params.temperature, params.top_p, params.store, params.stream) == (1.0, 1.0, True, False)
    assert params.truncation == "disabled" and params.tool_choice == "auto" and params.parallel_tool_calls
    assert params.text == {"format": {"type": "text"}, "verbosity": "medium"}
    assert params.echo["service_tier"] == "default"


def test_echoed_fields_are_kept():
    params = create(input="x", user="u1", safety_identifier="s1", prompt_cache_key="k", service_tier="flex",
                    prompt_cache_retention="24h", metadata={"a": "b"}, reasoning={"effort": "none"},
                    client_metadata={"originator": "codex_cli_rs"})
    # One tier serves everything: the echo is the tier used, as OpenAI's is.
    assert params.echo["user"] == "u1" and params.echo["service_tier"] == "default"
    assert params.metadata == {"a": "b"} and params.reasoning == {"effort": "none", "summary": None}
    assert params.client_metadata == {"originator": "codex_cli_rs"}


def test_reasoning_is_what_the_model_does_or_refused():
    # `summary: auto` lets the server choose, and with no summariser it chooses none (Codex sends it).
    assert create(input="x", reasoning={"summary": "auto"}).reasoning == {"effort": None, "summary": None}
    assert create(input="x", reasoning={"generate_summary": "auto"}).reasoning["summary"] is None
    for body, param in (({"effort": "low"}, "reasoning.effort"), ({"summary": "concise"}, "reasoning.summary"),
                        ({"generate_summary": "detailed"}, "reasoning.generate_summary"),
                        ({"budget": 3}, "reasoning.budget")):
        with pytest.raises(ApiError) as caught:
            create(input="x", reasoning=body)
        assert caught.value.kind.http_status == 400 and caught.value.param == param
    thinking = validate_create({"model": MODEL, "input": "x", "reasoning": {"effort": "medium"}}, [MODEL],
                               reasoning_model=True)
    assert thinking.reasoning["effort"] == "medium"
    with pytest.raises(ApiError) as caught:
        validate_create({"model": MODEL, "input": "x", "reasoning": {"effort": "high"}}, [MODEL], reasoning_model=True)
    assert caught.value.param == "reasoning.effort"


def test_an_effort_the_served_model_s_prompt_sets_is_taken_and_others_refused_naming_those():
    efforts = ("low", "medium", "high")  # gpt-oss's (Harmony's system message)
    for effort in efforts:
        params = validate_create({"model": MODEL, "input": "x", "reasoning": {"effort": effort}}, [MODEL],
                                 reasoning_model=True, efforts=efforts)
        assert params.effort == params.reasoning["effort"] == effort
    with pytest.raises(ApiError) as caught:
        validate_create({"model": MODEL, "input": "x", "reasoning": {"effort": "minimal"}}, [MODEL],
                        reasoning_model=True, efforts=efforts)
    assert caught.value.param == "reasoning.effort" and "'low', 'medium', 'high'" in caught.value.message
    assert create(input="x").effort is None
    off = validate_create({"model": MODEL, "input": "x", "reasoning": {"effort": "none"}}, [MODEL],
                          reasoning_model=True, efforts=("none",))  # a <think> template that turns thinking off
    assert off.effort == "none"
    with pytest.raises(ApiError) as caught:
        validate_create({"model": MODEL, "input": "x", "reasoning": {"effort": "high"}}, [MODEL],
                        reasoning_model=True, efforts=("none",))
    assert "it takes 'none', 'medium'" in caught.value.message


def test_stream_options_choose_obfuscation_and_nothing_else():
    assert create(input="x", stream=True).obfuscate
    assert not create(input="x", stream=True, stream_options={"include_obfuscation": False}).obfuscate
    for options, param in (({"include_usage": True}, "stream_options.include_usage"),
                           ({"include_obfuscation": "no"}, "stream_options.include_obfuscation")):
        with pytest.raises(ApiError) as caught:
            create(input="x", stream=True, stream_options=options)
        assert caught.value.param == param


BAD = [
    # (body, status, param, code)
    ([1, 2], 400, None, "invalid_body"),
    ({"input": "x"}, 400, "model", "missing_required_parameter"),
    ({"model": "other", "input": "x"}, 404, "model", "model_not_found"),
    ({"model": MODEL, "input": 5}, 400, "input", "invalid_type"),
    ({"model": MODEL, "input": {"role": "user"}}, 400, "input", "invalid_type"),
    ({"model": MODEL}, 400, "input", "missing_required_parameter"),
    ({"model": MODEL, "input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role", "invalid_value"),
    ({"model": MODEL, "input": [{"role": "user"}]}, 400, "input[0].content", "missing_required_parameter"),
    ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input[0].content[0].type", "unsupported_content"),
    ({"model": MODEL, "input": [{"type": "web_search_call", "id": "w"}]}, 400, "input[0].type", "unsupported_item_type"),
    ({"model": MODEL, "input": "x", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"model": MODEL, "input": "x", "temperature": -0.1}, 400, "temperature", "invalid_value"),
    ({"model": MODEL, "input": "x", "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"model": MODEL, "input": "x", "temperature": True}, 400, "temperature", "invalid_type"),
    ({"model": MODEL, "input": "x", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ({"model": MODEL, "input": "x", "presence_penalty": 2.5}, 400, "presence_penalty", "invalid_value"),
    ({"model": MODEL, "input": "x", "prompt": {}}, 400, "prompt", "unsupported_parameter"),
    ({"model": MODEL, "input": [{"role": "user", "content": "x", "prompt_cache_breakpoint": True}]}, 400,
     "input[0].prompt_cache_breakpoint", "unknown_parameter"),
    ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_text", "text": "x", "cache": 1}]}]},
     400, "input[0].content[0].cache", "unknown_parameter"),
    ({"model": MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}",
                                 "namespace": 3}]}, 400, "input[0].namespace", "invalid_type"),
    ({"model": MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}",
                                 "caller": {}}]}, 400, "input[0].caller", "unknown_parameter"),
    ({"model": MODEL, "input": [{"role": "assistant", "content": "x", "phase": "later"}]}, 400, "input[0].phase",
     "invalid_value"),
    ({"model": MODEL, "input": "x", "tools": [{**FN, "output_schema": OBJ}]}, 400, "tools[0].output_schema",
     "unknown_parameter"),
    ({"model": MODEL, "input": "x", "tools": [{**FN, "defer_loading": True}]}, 400, "tools[0].defer_loading",
     "unknown_parameter"),
    ({"model": MODEL, "input": "x", "frequency_penalty": -2.1}, 400, "frequency_penalty", "invalid_value"),
    ({"model": MODEL, "input": "x", "frequency_penalty": "high"}, 400, "frequency_penalty", "invalid_type"),
    ({"model": MODEL, "input": "x", "max_output_tokens": 15}, 400, "max_output_tokens", "integer_below_min_value"),
    ({"model": MODEL, "input": "x", "max_output_tokens": 16.5}, 400, "max_output_tokens", "invalid_type"),
    ({"model": MODEL, "input": "x", "top_logprobs": 21}, 400, "top_logprobs", "integer_out_of_range"),
    ({"model": MODEL, "input": "x", "top_logprobs": -1}, 400, "top_logprobs", "integer_out_of_range"),
    ({"model": MODEL, "input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata",
     "object_above_max_properties"),
    ({"model": MODEL, "input": "x", "metadata": {"k" * 65: "v"}}, 400, "metadata", "invalid_value"),
    ({"model": MODEL, "input": "x", "metadata": {"k": "v" * 513}}, 400, "metadata.k", "string_above_max_length"),
    ({"model": MODEL, "input": "x", "metadata": {"k": 1}}, 400, "metadata.k", "invalid_type"),
    ({"model": MODEL, "input": "x", "include": ["nope"]}, 400, "include[0]", "invalid_value"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].external_web_access",
     "unsupported_value"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "web_search", "external_web_access": True}]}, 400,
     "tools[0].external_web_access", "unsupported_value"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "web_search_preview"}]}, 400, "tools[0].type",
     "unsupported_tool_type"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "namespace", "name": "ns", "tools": []}]}, 400,
     "tools[0].tools", "invalid_value"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "namespace", "name": "ns", "tools": [
        {"type": "custom", "name": "c"}]}]}, 400, "tools[0].tools[0].type", "unsupported_tool_type"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "namespace", "name": "ns", "tools": [
        {"type": "function", "name": "f", "defer_loading": True}]}]}, 400, "tools[0].tools[0].defer_loading",
     "unknown_parameter"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "function", "parameters": OBJ}]}, 400, "tools[0].name",
     "missing_required_parameter"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "bad name!"}]}, 400, "tools[0].name",
     "invalid_value"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
     400, "tools[0].parameters.type", "invalid_schema"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "f", "parameters": "object"}]},
     400, "tools[0].parameters", "invalid_schema"),
    ({"model": MODEL, "input": "x", "tools": [FN, FN]}, 400, "tools[1].name", "invalid_value"),
    ({"model": MODEL, "input": "x", "tools": [{**FN, "strict": True, "parameters": {**OBJ, "properties": {
        "s": {"type": "string", "minLength": 2}}, "required": ["s"]}}]}, 400,
     "tools[0].parameters.properties.s.minLength", "unsupported_schema_keyword"),
    ({"model": MODEL, "input": "x", "tools": [{**FN, "strict": True, "parameters": {"type": "object",
                                                                                  "properties": {}}}]}, 400,
     "tools[0].parameters.additionalProperties", "invalid_schema"),
    ({"model": MODEL, "input": "x", "tools": [{**FN, "strict": True, "parameters": {
        **OBJ, "properties": {"a": {"type": "string"}}}}]}, 400, "tools[0].parameters.required", "invalid_schema"),
    ({"model": MODEL, "input": "x", "tools": [FN], "tool_choice": {"type": "function", "name": "nope"}}, 400,
     "tool_choice.name", "invalid_value"),
    ({"model": MODEL, "input": "x", "tools": [FN], "tool_choice": {"type": "allowed_tools", "mode": "required",
                                                                   "tools": [{"type": "function", "name": "g"}]}},
     400, "tool_choice.tools[0]", "invalid_value"),
    ({"model": MODEL, "input": "x", "tools": [FN], "tool_choice": {"type": "mcp", "server_label": "s"}}, 400,
     "tool_choice.type", "unsupported_value"),
    ({"model": MODEL, "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, 400,
     "text.format.schema", "missing_required_parameter"),
    ({"model": MODEL, "input": "x", "text": {"format": {"type": "json_schema", "schema": OBJ}}}, 400,
     "text.format.name", "invalid_value"),
    ({"model": MODEL, "input": "x", "text": {"format": {"type": "json_schema", "name": "n", "strict": True,
                                                        "schema": {"type": "object", "properties": {
                                                            "a": {"type": "string"}}, "required": ["a"]}}}},
     400, "text.format.schema.additionalProperties", "invalid_schema"),
    ({"model": MODEL, "input": "x", "text": {"format": {"type": "yaml"}}}, 400, "text.format.type", "invalid_value"),
    ({"model": MODEL, "input": "x", "tool_choice": "sometimes"}, 400, "tool_choice", "invalid_value"),
    ({"model": MODEL, "input": "x", "tool_choice": "required"}, 400, "tool_choice", "invalid_value"),
    ({"model": MODEL, "input": "x", "truncation": "middle"}, 400, "truncation", "invalid_value"),
    ({"model": MODEL, "input": "x", "previous_response_id": "abc"}, 400, "previous_response_id", "invalid_value"),
    ({"model": MODEL, "input": "x", "background": True, "store": False}, 400, "store", "invalid_value"),
    ({"model": MODEL, "input": "x", "background": "yes"}, 400, "background", "invalid_type"),
    ({"model": MODEL, "input": "x", "conversation": "c_1"}, 400, "conversation", "invalid_value"),
    ({"model": MODEL, "input": "x", "conversation": {"id": 3}}, 400, "conversation.id", "invalid_type"),
    ({"model": MODEL, "input": "x", "conversation": {"id": "conv_1", "x": 1}}, 400, "conversation.x",
     "unknown_parameter"),
    ({"model": MODEL, "input": "x", "conversation": "conv_1", "previous_response_id": "resp_1"}, 400, "conversation",
     "invalid_value"),
    ({"model": MODEL, "input": "x", "conversation": "conv_1", "store": False}, 400, "store", "invalid_value"),
    ({"model": MODEL, "input": "x", "text": {"verbosity": "loud"}}, 400, "text.verbosity", "invalid_value"),
    ({"model": MODEL, "input": "x", "reasoning": {"effort": "max"}}, 400, "reasoning.effort", "invalid_value"),
    ({"model": MODEL, "input": "x", "service_tier": "gold"}, 400, "service_tier", "invalid_value"),
    ({"model": MODEL, "input": "x", "safety_identifier": "s" * 65}, 400, "safety_identifier", "string_above_max_length"),
    ({"model": MODEL, "input": "x", "store": "yes"}, 400, "store", "invalid_type"),
    ({"model": MODEL, "input": "x", "stream_options": {"include_obfuscation": False}}, 400, "stream_options",
     "invalid_value"),
    ({"model": MODEL, "input": "x", "frobnicate": 1}, 400, "frobnicate", "unknown_parameter"),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[f"{b[2]}:{b[3]}" for b in BAD])
def test_bad_input_is_a_clear_openai_error(body, status, param, code):
    error = rejected(body)
    assert error.kind.http_status == status
    assert error.param == param
    assert error.code == code
    shape = error.to_openai()["error"]
    assert set(shape) == {"message", "type", "param", "code"} and shape["message"]


def test_function_tools_and_choices_resolve():
    weather = {"type": "function", "name": "get_weather", "description": "d",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"], "additionalProperties": False}}
    loose = {"type": "function", "name": "search", "strict": False,
             "parameters": {"type": "object", "properties": {"q": {"type": "string", "minLength": 1}}}}
    params = create(input="x", tools=[weather, loose], tool_choice="required", parallel_tool_calls=False)
    assert [t["name"] for t in params.tools] == ["get_weather", "search"] and params.tools[0]["strict"] is True
    assert params.tool_mode == "required" and len(params.callable_tools) == 2
    named = create(input="x", tools=[weather, loose], tool_choice={"type": "function", "name": "search"})
    assert named.tool_mode == "required" and [t["name"] for t in named.callable_tools] == ["search"]
    allowed = create(input="x", tools=[weather, loose], tool_choice={
        "type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "get_weather"}]})
    assert allowed.tool_mode == "auto" and [t["name"] for t in allowed.callable_tools] == ["get_weather"]
    assert create(input="x", tools=[weather], tool_choice="none").tool_mode == "none"


def test_structured_output_formats_are_echoed():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    params = create(input="x", text={"format": {"type": "json_schema", "name": "thing", "schema": schema,
                                                "strict": True}, "verbosity": "low"})
    assert params.text == {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True},
                           "verbosity": "low"}
    assert create(input="x", text={"format": {"type": "json_object"}}).text["format"] == {"type": "json_object"}


def test_a_tool_without_strict_is_strict_when_its_schema_allows_and_non_strict_otherwise():
    plain = {**FN, "parameters": {"type": "object", "properties": {"a": {"type": "string", "minLength": 2}}}}
    fitting = {**FN, "name": "g", "parameters": {**OBJ, "properties": {"a": {"type": "string"}}, "required": ["a"]}}
    params = validate_create({"model": MODEL, "input": "x", "tools": [plain, fitting]}, [MODEL])
    assert [tool["strict"] for tool in params.tools] == [False, True]


def test_an_assistant_messages_phase_is_kept():
    params = validate_create({"model": MODEL, "input": [
        {"role": "assistant", "content": "Checking.", "phase": "commentary"}, {"role": "user", "content": "ok"}]},
        [MODEL])
    assert params.input_items[0]["phase"] == "commentary" and "phase" not in params.input_items[1]


@pytest.mark.parametrize("body, param", [
    ({"input": [{"type": {}, "id": "x"}]}, "input[0].type"),
    ({"input": [{"type": "compaction", "id": [None, None], "encrypted_content": ""}]}, "input[0].id"),
    ({"input": [{"role": "user", "content": "x", "status": {"a": 1}}]}, "input[0].status"),
    ({"input": [{"role": "user", "content": [{"type": []}]}]}, "input[0].content[0].type"),
    ({"input": "x", "include": [{}]}, "include[0]"),
    ({"input": [{"type": "reasoning", "summary": [1]}]}, "input[0].summary[0]"),
    ({"input": [{"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": 3}]}]},
     "input[0].content[0].text"),
    ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": "x", "extra": 1}]}]},
     "input[0].summary[0].extra"),
])
def test_values_of_the_wrong_shape_anywhere_are_a_400_naming_them(body, param):
    # A dict where a string belongs once reached a set lookup and became a 500 (found by the fuzzer).
    error = rejected({"model": MODEL, **body})
    assert error.kind.http_status == 400 and error.param == param
