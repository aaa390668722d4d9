"""A deterministic engine with no model: for protocol tests and for running without weights.

Tokens are whitespace-separated words. With no script it answers with a fixed sentence; a
script (list of text pieces) makes it emit exactly those pieces, one token each, so tests can
assert exact event sequences. `delay` slows it down for disconnect tests, and `aborted`
records whether a generation was stopped early.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from parley.engine.base import ChatMessage, Finished, SamplingParams, TextDelta, TokenLogprob

DEFAULT_REPLY = "Hello from Parley's scripted engine."


class ScriptedEngine:
    def __init__(self, model_id: str = "scripted", context_window: int = 4096,
                 script: list[str] | None = None, delay: float = 0.0):
        self.model_id = model_id
        self.context_window = context_window
        self.tool_format = "hermes"
        self.reasoning_format = "none"
        self.last_params: SamplingParams | None = None
        self.script = script
        self.delay = delay
        self.prompts: list[list[ChatMessage]] = []
        self.emitted_tokens = 0
        self.aborted = 0
        self.fail_after: int | None = None

    def render_prompt(self, messages: list[ChatMessage]) -> list[int]:
        self.prompts.append(list(messages))
        words = sum(len(m.content.split()) + 2 for m in messages)
        return list(range(words + 1))

    def _pieces(self) -> list[str]:
        if self.script is not None:
            return list(self.script)
        words = DEFAULT_REPLY.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator:
        self.last_params = params
        pieces = self._pieces()
        produced = 0
        finished = False
        try:
            for piece in pieces:
                if produced >= params.max_tokens:
                    break
                if self.fail_after is not None and produced >= self.fail_after:
                    raise RuntimeError("scripted engine failure")
                if self.delay:
                    await asyncio.sleep(self.delay)
                produced += 1
                self.emitted_tokens += 1
                logprobs = () if params.top_logprobs is None else (
                    TokenLogprob(piece, -0.5, tuple(piece.encode()),
                                 tuple((piece, -0.5, tuple(piece.encode())) for _ in range(params.top_logprobs))),)
                yield TextDelta(piece, 1, logprobs)
            reason = "length" if produced < len(pieces) else "stop"
            finished = True
            yield Finished(reason, len(prompt), produced)
        finally:
            if not finished:
                self.aborted += 1

    async def close(self) -> None:
        return None
