"""Driving an engine directly in unit tests: one generation collected, and waiting for a state."""

from __future__ import annotations

import asyncio

from parley.engine.base import Finished


async def collect(engine, prompt, params) -> tuple[list, Finished | None]:
    """All of one generation: its deltas (batches flattened) and its Finished."""
    deltas, finished = [], None
    async for step in engine.generate(prompt, params):
        if isinstance(step, Finished):
            finished = step
        else:
            deltas += step if isinstance(step, list) else [step]
    return deltas, finished


async def eventually(condition, seconds: float = 5.0) -> None:
    """Wait until `condition()` holds, polling; fail after `seconds`."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")
