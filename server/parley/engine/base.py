"""The engine port: one small async interface that every engine implements.

An engine turns chat messages into prompt tokens (its own chat template and tokenizer) and
streams generated text for a token prompt. The service never sees engine internals; heavy
engines are imported lazily by the registry, so the CPU path never imports TensorRT-LLM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Literal, NamedTuple, Protocol

FinishReason = Literal["stop", "length"]


class ChatMessage(NamedTuple):
    """A tuple, not a frozen dataclass: a turn builds one per item of its whole context, and a
    frozen dataclass's __init__ costs several times a tuple's."""

    role: str  # system | developer | user | assistant | tool (results, in a format whose results_role is tool)
    content: str
    # Set only for an engine whose chat template renders tools itself (Engine.native_tools); the
    # content then holds no tool markup. On the first (developer) message: the functions offered,
    # as JSON text of their signatures. On an assistant message: its calls (call id, function
    # name, arguments JSON text). On a tool message: (call id, function name) of the call it answers.
    tools: str = ""
    calls: tuple[tuple[str, str, str], ...] = ()
    call: tuple[str, str | None] | None = None
    # On the first (developer) message, where the prompt sets the reasoning effort (ToolFormat.efforts:
    # Harmony's system message, a <think> template's enable_thinking): the effort asked for; "" for
    # the natural one.
    effort: str = ""

    @property
    def only_effort(self) -> bool:
        """A message that carries nothing but the effort: renderers set the effort, and write no message."""
        return bool(self.effort) and not self.content and not self.tools


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What the output must be, engine-neutral; each engine compiles it (GBNF, xgrammar, ...).

    kind "tools": a call of one of `tools` [(name, JSON schema of the arguments)] in the tool
    format of the engine's family; mode "required" (a call is guaranteed), "auto" (text or
    calls) or "none" (text that can never contain a call); `parallel` allows several calls.
    kind "json_schema": JSON valid against `schema`. kind "json_object": some JSON object.
    """

    kind: str
    schema: dict | None = None
    tools: tuple[tuple[str, dict | None], ...] = ()
    mode: str = "auto"
    parallel: bool = True
    max_calls: int | None = None


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0   # OpenAI's: subtracted once from a token that appeared in the output
    frequency_penalty: float = 0.0  # ... and times the number of times it appeared
    seed: int | None = None
    constraint: Constraint | None = None
    top_logprobs: int | None = None  # None: no logprobs; 0..20: the sampled token plus that many alternatives
    # Requests of different scopes never share cached prompt tokens: the service sets its project,
    # so one tenant's prefixes are never reused for (nor timed by) another's.
    cache_scope: str = ""


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@dataclasses.dataclass(frozen=True)
class TextDelta:
    """New text; `tokens` is how many generated tokens it covers (0 while bytes are pending)."""

    text: str
    tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: FinishReason
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # prompt tokens newly written to a reusable prefix cache


class EngineError(Exception):
    """A generation the engine could not finish; its message is safe to show the client."""


class RequestFailed(EngineError):
    """The engine failed this one request (TensorRT-LLM's RequestError); others go on."""


class EngineDead(EngineError):
    """The engine is gone (TensorRT-LLM's EngineDeadError): every running request fails with
    it, health() turns not ok (probes fail, the pod restarts) and new requests get 503."""


@dataclasses.dataclass(frozen=True)
class EngineHealth:
    """Whether the engine can generate; `detail` says why not (logged, and in 503 messages)."""

    ok: bool
    detail: str | None = None


# A step is one TextDelta, several that were ready together (a list), or the final Finished.
EngineEvent = TextDelta | list[TextDelta] | Finished


class Engine(Protocol):
    model_id: str
    context_window: int
    tool_format: str       # the tool-call format's family: "hermes" (generic), "llama3_json", "mistral", "harmony"
    reasoning_format: str  # "none", "think" for <think>...</think> families, "harmony" (analysis channel)
    # Whether render_prompt is slow enough (a Hugging Face tokenizer over a long context) that the
    # service calls it on a worker thread rather than on the event loop. Optional; default False.
    renders_off_loop: bool
    # The prompt message by message (engine/segments.py: MessageRendering), where the engine's
    # template renders each message on its own: a long conversation's turn then renders only its
    # new messages. Optional; None or absent: every prompt is rendered whole.
    message_rendering: object | None
    # Whether the chat template renders tools, calls and results itself (Hugging Face's `tools=`
    # and `tool_calls`): messages then arrive structured (ChatMessage's tool fields). Optional;
    # default False.
    native_tools: bool
    # Reasoning efforts the engine's template sets besides its natural one and its format's own
    # (engine/template_tools.py: `none` where a <think> template can turn thinking off). Optional.
    reasoning_efforts: tuple[str, ...]

    def render_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """Apply the model's chat template (with the generation prompt) and tokenize.

        Tool definitions and tool calls arrive already rendered as messages in the engine's
        `tool_format` (service/conversation.py), so templates without tool support work too;
        an engine with `native_tools` gets them structured instead."""

    def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[EngineEvent]:
        """Stream TextDelta events (a list when several tokens are ready at once), then one Finished.

        A failure the engine reports raises EngineError (RequestFailed, EngineDead): its message
        reaches the client in `response.failed`; any other exception is a bug, shown generically.

        Closing the iterator early (aclose, or a cancelled consumer) is the abort: it must stop
        generation in the engine within a token or two, and release what the request held. An
        engine whose backend needs an explicit abort call (TensorRT-LLM's `abort()`) makes it in
        the generator's own `finally`; the service never calls anything else to stop a request.
        """

    def health(self) -> EngineHealth:
        """Cheap and non-blocking; polled by the server's health reporting and checked before
        every new request. A dead engine makes the gRPC health service report NOT_SERVING (the
        pod's probes fail and it restarts) and new requests get 503. An engine with
        `restart_heals = False` (one in another process) fails only readiness: restarting this
        process would not bring that engine back, so liveness (the service "") stays SERVING."""

    def check_constraint(self, constraint: Constraint | None) -> None:
        """Raise ValueError (its message says why) when the engine cannot enforce `constraint`:
        called before a request is stored, so that it is a 400, never a failed response."""

    def kv_cache_usage(self) -> float | None:
        """The share of KV cache cells in use (0..1), for metrics; None when the engine has no
        such figure. Cheap, any thread."""

    # Optional: `async def start(self)`, awaited once on the server's loop before it serves (the
    # remote engine connects to its engine process there).

    async def close(self) -> None: ...
