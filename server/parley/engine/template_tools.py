"""Tools in a chat template's own words (docs/engines.md, "Tools in the template's own words").

A template that renders tools (Hugging Face's `tools=` argument, assistant `tool_calls`, `tool`
messages) is trusted with them once a probe turn shows it writes them whole. Its engine then gets
structured messages (ChatMessage's tool fields; the conversation builds them for a native
ToolFormat) and renders them here; a turn the template refuses is written in the family format
instead. The engines differ only in how a template is applied (`RenderChat`): the TensorRT-LLM
adapter through the Hugging Face tokenizer, the llama.cpp engine through its own Jinja sandbox.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from parley.engine.base import ChatMessage
from parley.engine.formats.tool_format import ToolFormat, function_signatures
from parley.log import get_logger

log = get_logger(__name__)

# (Hugging Face chat messages, the tools' signatures or None, whether to add the generation prompt,
# further template variables) -> text
RenderChat = Callable[[list[dict], list[dict] | None, bool, dict], str]
# The reasoning effort a `<think>` template can set besides its natural one: `none`, thinking off
# (Qwen3's `enable_thinking`, which writes an empty think block into the generation prompt).
THINKING_SWITCH = "enable_thinking"
THINKING_EFFORTS = ("none",)

# A turn that offers a tool, calls it and returns its result: what a template trusted with tools
# must show of it (check).
PROBE_FUNCTION, PROBE_INSTRUCTIONS = "parley_probe_lookup", "Parley probe instructions."
PROBE_DESCRIPTION, PROBE_CITY, PROBE_RESULT = "Parley probe: a city's weather.", "Probe-City", "probe-result-sunny"
PROBE_TURN = (
    ChatMessage("developer", PROBE_INSTRUCTIONS, tools=json.dumps([{
        "name": PROBE_FUNCTION, "description": PROBE_DESCRIPTION,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])),
    ChatMessage("user", "What is the weather in Probe-City?"),
    ChatMessage("assistant", "", calls=(("call_probe", PROBE_FUNCTION, json.dumps({"city": PROBE_CITY})),)),
    ChatMessage("tool", PROBE_RESULT, call=("call_probe", PROBE_FUNCTION)),
)
CALL_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _role(message: ChatMessage) -> str:
    return "system" if message.role == "developer" else message.role  # OpenAI's name for the system role


def plain_chat(messages: list[ChatMessage]) -> list[dict]:
    """Messages whose tools (if any) are already text, as Hugging Face chat messages."""
    return [{"role": _role(message), "content": message.content} for message in messages if not message.only_effort]


def structured_chat(messages: list[ChatMessage]) -> tuple[list[dict], list[dict] | None]:
    """Structured messages as Hugging Face chat messages and the `tools=` signatures. A developer
    message that only offers tools is left out: the template's own system prompt opens, with them."""
    chat, tools = [], None
    for message in messages:
        if message.tools:
            tools = function_signatures(json.loads(message.tools))
        if not message.content and (message.tools or message.effort):
            continue
        entry: dict[str, Any] = {"role": _role(message), "content": message.content}
        if message.calls:
            entry["tool_calls"] = [{"type": "function", "id": call_id_for_template(call_id),
                                    "function": {"name": name, "arguments": arguments_for_template(arguments)}}
                                   for call_id, name, arguments in message.calls]
        if message.call is not None:
            entry["tool_call_id"] = call_id_for_template(message.call[0])
            if message.call[1]:
                entry["name"] = message.call[1]
        chat.append(entry)
    return chat, tools


def call_id_for_template(call_id: str) -> str:
    """A call id templates accept: Mistral's refuse any but 9 letters and digits. It only pairs a
    result with its call inside the prompt, so a digest of the client's id serves, the same each
    turn (the prompt's prefix stays cacheable)."""
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    letters = []
    for _ in range(9):
        digest, index = divmod(digest, len(CALL_ID_ALPHABET))
        letters.append(CALL_ID_ALPHABET[index])
    return "".join(letters)


def arguments_for_template(arguments: str):
    """A call's arguments as templates expect them (a mapping, which they write with `tojson`);
    text that is not a JSON object stays text."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


def efforts_of(template: str, reasoning_format: str, rendered_whole: bool) -> tuple[str, ...]:
    """The reasoning efforts a template can set besides its natural one. Thinking off changes the
    generation prompt, which message-by-message rendering keeps: only a template rendered whole."""
    return THINKING_EFFORTS if reasoning_format == "think" and THINKING_SWITCH in template and rendered_whole else ()


def render(messages: list[ChatMessage], generation: bool, render_chat: RenderChat, fmt: ToolFormat,
           structured: bool) -> str:
    """The messages through the template: `structured` (native_tools) with their tool fields,
    and a turn the template then refuses (its raise_exception) in the family format, which
    serves any template. The effort the first message asks for becomes a template variable."""
    effort = messages[0].effort if messages else ""
    variables = {THINKING_SWITCH: False} if effort == "none" else {}
    if structured:
        try:
            return render_chat(*structured_chat(messages), generation, variables)
        except Exception as exc:
            log.warning("engine.template_tools_refused", error=type(exc).__name__, detail=str(exc)[:200])
            messages = fmt.flattened(messages)
    return render_chat(plain_chat(messages), None, generation, variables)


def check(template: str, render_chat: RenderChat, fmt: ToolFormat, enabled: bool = True) -> tuple[bool, str]:
    """Whether to trust the template with tools, and why (or why not): `enabled` (the setting
    template_tools), the template must take `tools`, and its rendering of the probe turn must hold
    the instructions, the tool's description, the call as the family writes it (what the parser
    and the grammar expect), its arguments and the result."""
    if not enabled:
        return False, "template_tools is off"
    if "tools" not in template:
        return False, "the chat template takes no tools"
    try:
        text = render_chat(*structured_chat(list(PROBE_TURN)), True, {})
    except Exception as exc:
        return False, f"the chat template failed on a probe turn with tools ({type(exc).__name__})"
    expected = {"the instructions": PROBE_INSTRUCTIONS, "the tool's description": PROBE_DESCRIPTION,
                "the call in the family's format": fmt.call_open + fmt.call_prefix(PROBE_FUNCTION),
                "the call's arguments": PROBE_CITY, "the result": PROBE_RESULT}
    missing = [what for what, needle in expected.items() if needle not in text]
    if missing:
        return False, "the chat template's rendering of a probe turn with tools lacks " + ", ".join(missing)
    return True, "the chat template renders tools, calls and results"
