"""A deterministic engine with no model: for protocol tests and for running without weights.

Tokens are whitespace-separated words. With no script it answers with a fixed sentence; a
script (list of text pieces) makes it emit exactly those pieces, one token each. `delay` slows
it down (disconnect tests, demos). Test instrumentation (recorded prompts, injected failures)
lives in tests/fakes, not here.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator

from parley.engine.base import ChatMessage, EngineHealth, Finished, SamplingParams, TextDelta, TokenLogprob

DEFAULT_REPLY = "Hello from Parley's scripted engine."
START, CLOSE, OPEN, WORDS = 0, 1, 2, 16  # its prompt tokens
ROLES = ("system", "developer", "user", "assistant")


class ScriptedEngine:
    tool_format = "hermes"
    reasoning_format = "none"

    def __init__(self, model_id: str = "scripted", context_window: int = 4096,
                 script: list[str] | None = None, delay: float = 0.0):
        self.model_id = model_id
        self.context_window = context_window
        self.script = script
        self.delay = delay

    def render_prompt(self, messages: list[ChatMessage]) -> list[int]:
        return [token for index, message in enumerate(messages) for token in self.render_message(message, index == 0)]

    # Its prompt is its messages' renderings end to end (engine/segments.py): a start token, then
    # for each message an opening that names the role, a token per word (its checksum, so that
    # different words are different tokens) and a closing; no generation prompt.
    @property
    def message_rendering(self):
        return self

    @staticmethod
    def render_message(message: ChatMessage, first: bool) -> list[int]:
        return [*((START,) if first else ()), OPEN + ROLES.index(message.role),
                *(WORDS + zlib.crc32(word.encode()) % 65536 for word in message.content.split()), CLOSE]

    @staticmethod
    def generation_prompt() -> list[int]:
        return []

    def _pieces(self) -> list[str]:
        if self.script is not None:
            return list(self.script)
        words = DEFAULT_REPLY.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator:
        pieces = self._pieces()
        produced = 0
        for piece in pieces:
            if produced >= params.max_tokens:
                break
            if self.delay:
                await asyncio.sleep(self.delay)
            produced += 1
            yield TextDelta(piece, 1, self._logprobs(piece, params))
        yield Finished("length" if produced < len(pieces) else "stop", len(prompt), produced)

    @staticmethod
    def _logprobs(piece: str, params: SamplingParams) -> tuple[TokenLogprob, ...]:
        if params.top_logprobs is None:
            return ()
        raw = tuple(piece.encode())
        return (TokenLogprob(piece, -0.5, raw, tuple((piece, -0.5, raw) for _ in range(params.top_logprobs))),)

    def check_constraint(self, constraint) -> None:
        pass  # constraints are not enforced here (no sampler)

    def kv_cache_usage(self) -> float | None:
        return None  # no KV cache

    def health(self) -> EngineHealth:
        return EngineHealth(True)

    async def close(self) -> None:
        return None
