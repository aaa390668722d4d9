"""A model-free engine for benchmarks: emits tokens as fast as asked, or at a fixed per-stream rate.

It goes through the same interface as real engines, so the serving path (pipeline, codec, gRPC,
Envoy) is measured alone. Tokens are yielded in steps: everything due at a step travels
together, as a fast real engine's tokens would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from parley.engine.base import ChatMessage, EngineHealth, Finished, SamplingParams, TextDelta

TOKEN = TextDelta(" tok", 1)
BURST = 16  # tokens per step when unpaced: other streams get the event loop between steps


class SyntheticEngine:
    tool_format = "hermes"
    reasoning_format = "none"

    def __init__(self, model_id: str = "synthetic", context_window: int = 32768, output_tokens: int = 256,
                 tokens_per_second: float = 0.0):
        self.model_id = model_id
        self.context_window = context_window
        self.output_tokens = output_tokens
        self.tokens_per_second = tokens_per_second

    def render_prompt(self, messages: list[ChatMessage]) -> list[int]:
        return list(range(1 + sum(len(m.content) // 4 + 4 for m in messages)))

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator:
        total = min(self.output_tokens, params.max_tokens)
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while sent < total:
            if self.tokens_per_second > 0:
                # Token `sent` (from 0) is due at sent / rate. It goes when its timer fires, even
                # a little early (uvloop's timers count whole milliseconds): one wake-up per
                # token, as a model's, not a spin until the clock agrees. Overdue tokens go too.
                delay = sent / self.tokens_per_second - (loop.time() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                due = min(total, max(sent + 1, int((loop.time() - start) * self.tokens_per_second) + 1))
            else:
                await asyncio.sleep(0)
                due = min(total, sent + BURST)
            yield [TOKEN] * (due - sent)
            sent = due
        yield Finished("length" if total < self.output_tokens else "stop", len(prompt), total)

    def check_constraint(self, constraint) -> None:
        pass  # constraints are not enforced here (no sampler)

    def kv_cache_usage(self) -> float | None:
        return None  # no KV cache

    def health(self) -> EngineHealth:
        return EngineHealth(True)

    async def close(self) -> None:
        return None
