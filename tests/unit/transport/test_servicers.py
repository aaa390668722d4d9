"""The REST servicer's message grouping: what is ready together leaves together, nothing waits."""

import asyncio
import gc

import pytest
from parley.engine.synthetic import SyntheticEngine
from parley.service.event_log import EventBatch
from parley.transport.servicers import COALESCE_TURNS, _coalesced, _sse_messages

from tests.support.pipeline import service_on


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


async def test_a_waiting_stream_keeps_none_of_the_batches_it_sent(tmp_path):
    """Open streams mostly wait for their next token: what they already sent (event dicts and
    their JSON bytes, tens of KiB) must be garbage by then, not pinned by a suspended frame."""
    engine = SyntheticEngine(output_tokens=8, tokens_per_second=0.05)  # a token now, the next in 20 s
    async with service_on(tmp_path / "s.sqlite3", engine) as service:
        prepared = await service.prepare("default", {"model": engine.model_id, "input": "hi", "stream": True})
        messages = _sse_messages(_coalesced(service.run(prepared)), obfuscate=True)
        sent = b""
        while b"response.output_text.delta" not in sent:
            sent += (await anext(messages)).data
        waiting = asyncio.ensure_future(anext(messages))  # suspended until the next token
        await asyncio.sleep(0.05)
        await service.drain()
        gc.collect()
        assert [o for o in gc.get_objects() if isinstance(o, EventBatch)] == []
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await messages.aclose()


async def test_a_client_that_stops_reading_stops_the_generation_and_bounds_what_waits(monkeypatch):
    from parley.transport import servicers

    monkeypatch.setattr(servicers, "MAX_QUEUED_EVENTS", 8)
    monkeypatch.setattr(servicers, "SLOW_READER_SECONDS", 0.2)
    produced, closed = [], asyncio.Event()

    async def endless():  # a model far faster than its client
        try:
            for n in range(100_000):
                produced.append(n)
                yield batch(n)
                await asyncio.sleep(0)
        finally:
            closed.set()

    messages = _coalesced(endless())
    first = await anext(messages)  # then the client reads nothing
    async with asyncio.timeout(5):
        await closed.wait()  # the generation was stopped
    assert len(produced) <= len(first) + 8 + 1  # what was sent, what may wait, the one held back
    rest = []
    with pytest.raises(servicers.SlowReader):
        async for message in messages:  # the client reads again: what waited, then the end
            rest += [event["sequence_number"] for event in message]
    assert rest == list(range(len(first), len(first) + len(rest)))


async def test_an_event_stream_ends_with_done_even_when_it_has_no_event():
    async def two():
        for n in range(2):
            events = EventBatch([{"type": "response.in_progress", "sequence_number": n}])
            events.encoded = [b"{}"]
            yield events

    async def none():
        return
        yield

    assert [m.data for m in [m async for m in _sse_messages(two(), obfuscate=True)]][-1] == b"data: [DONE]\n\n"
    assert [m.data async for m in _sse_messages(none(), obfuscate=True)] == [b"data: [DONE]\n\n"]
