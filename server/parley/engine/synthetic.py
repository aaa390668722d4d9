"""A model-free engine for benchmarks: emits tokens as fast as asked, or at a fixed per-stream rate.

It goes through the same interface as real engines, so the serving path (pipeline, codec, gRPC,
Envoy) is measured alone. Tokens are yielded in steps: everything due at a step travels
together, as a fast real engine's tokens would.

Lockstep mode (`step_seconds`) is a batching GPU's rhythm: the engine steps on its own clock,
and every running sequence gets one token per step. A stream's first token comes at the first
step after it arrives (its prefill); a stream whose consumer falls behind finds several tokens
due when it next runs, and they go together, as a GPU engine's would pile up for a busy server.
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
                 tokens_per_second: float = 0.0, step_seconds: float = 0.0):
        self.model_id = model_id
        self.context_window = context_window
        self.output_tokens = output_tokens
        self.tokens_per_second = tokens_per_second
        self.step_seconds = step_seconds
        self._clock: _StepClock | None = None

    def render_prompt(self, messages: list[ChatMessage]) -> list[int]:
        return list(range(1 + sum(len(m.content) // 4 + 4 for m in messages)))

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator:
        if self.step_seconds > 0:
            async for step in self._lockstep(prompt, params):
                yield step
            return
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

    async def _lockstep(self, prompt: list[int], params: SamplingParams) -> AsyncIterator:
        if self._clock is None:
            self._clock = _StepClock(self.step_seconds)
        total = min(self.output_tokens, params.max_tokens)
        joined = self._clock.step  # the first token comes with the next step
        sent = 0
        while sent < total:
            step = await self._clock.after(joined + sent)
            due = min(total, step - joined)
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


class _StepClock:
    """The engine's step counter, advancing every `seconds` of wall time whether or not anyone
    is waiting (a GPU does not wait for the server). One timer per step wakes every waiter."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._origin = self._loop.time()
        self._waiting: list[asyncio.Future] = []  # each waiter's own: cancelling one leaves the rest

    @property
    def step(self) -> int:
        return int((self._loop.time() - self._origin) / self.seconds)

    async def after(self, step: int) -> int:
        """Wait until the clock has passed `step`; return the step it is at."""
        while self.step <= step:
            if not self._waiting:
                self._loop.call_at(self._origin + (self.step + 1) * self.seconds, self._tick)
            woken = self._loop.create_future()
            self._waiting.append(woken)
            await woken
        return self.step

    def _tick(self) -> None:
        waiting, self._waiting = self._waiting, []
        for woken in waiting:
            if not woken.done():
                woken.set_result(None)
