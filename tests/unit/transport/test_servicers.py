"""The REST servicer's message grouping: what is ready together leaves together, nothing waits."""

import asyncio

import pytest
from parley.service.responses import EventBatch
from parley.transport.servicers import COALESCE_TURNS, _coalesced


def batch(*numbers: int) -> EventBatch:
    events = EventBatch({"sequence_number": n} for n in numbers)
    events.encoded = [str(n).encode() for n in numbers]
    return events


async def messages_of(source) -> list[list[int]]:
    return [[e["sequence_number"] for e in message] async for message in _coalesced(source)]


async def test_steps_an_engine_has_ready_leave_as_one_message():
    async def ahead():  # an engine far ahead of its client: a step every turn of the loop
        for n in range(0, 12, 2):
            yield batch(n, n + 1)
            await asyncio.sleep(0)

    messages = await messages_of(ahead())
    assert sum(messages, []) == list(range(12))  # nothing lost, nothing reordered
    assert 1 < len(messages) < 6  # merged, yet still streamed in parts
    assert max(len(m) for m in messages) <= 2 * (COALESCE_TURNS + 1)


async def test_a_step_that_is_not_ready_is_not_waited_for():
    sent: list[float] = []
    loop = asyncio.get_running_loop()

    async def paced():  # a real engine: the next token is milliseconds away
        for n in range(3):
            yield batch(n)
            await asyncio.sleep(0.02)

    async for message in _coalesced(paced()):
        sent.append(loop.time())
        assert len(message) == 1
    assert len(sent) == 3


async def test_the_pipelines_failure_reaches_the_writer():
    async def failing():
        yield batch(0)
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        await messages_of(failing())
