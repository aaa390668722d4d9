"""The event log: when what is handed over gets written. Only lower bounds on time are asserted
(a timer never fires early); upper bounds are generous timeouts."""

import asyncio

import pytest
from parley.service.event_log import EventLog, WritePolicy
from parley.store.signals import EVENTS, LocalSignals

from tests.fakes.engines import ScriptedEngine
from tests.support.pipeline import service_on, stream

LAZY = 0.5


class RecordingStore:
    """Records each write: when it started and which responses' runs it held."""

    def __init__(self):
        self.writes: list[tuple[float, dict]] = []

    async def append_event_batches(self, batches, creates=(), finishes=()):
        self.writes.append((asyncio.get_running_loop().time(), dict(batches)))


@pytest.fixture
def store():
    return RecordingStore()


@pytest.fixture
def sink(store):
    return EventLog(store, LocalSignals(), WritePolicy(interval=0.01, lazy_interval=LAZY))


async def written(store: RecordingStore, count: int = 1) -> None:
    async with asyncio.timeout(5):
        while len(store.writes) < count:
            await asyncio.sleep(0.005)


async def test_lazy_events_wait_for_the_lazy_interval(sink, store):
    added = asyncio.get_running_loop().time()
    sink.append("resp_a", [(0, 0, b"a")], lazy=True)
    await written(store)
    assert store.writes[0][0] - added >= LAZY - 0.002  # timers may round to the millisecond
    assert store.writes[0][1] == {"resp_a": [(0, 0, b"a")]}


async def test_anything_prompt_takes_pending_lazy_events_along(sink, store):
    sink.append("resp_a", [(0, 0, b"a")], lazy=True)
    await asyncio.sleep(0.05)
    assert store.writes == []
    sink.append("resp_b", [(0, 0, b"b")])
    await written(store)
    assert store.writes[0][1] == {"resp_a": [(0, 0, b"a")], "resp_b": [(0, 0, b"b")]}
    await asyncio.sleep(LAZY + 0.1)
    assert len(store.writes) == 1  # the lazy timer went with the write: nothing left to write


async def test_a_final_document_takes_pending_lazy_events_along(sink, store):
    added = asyncio.get_running_loop().time()
    sink.append("resp_a", [(0, 0, b"a")], lazy=True)
    sink.finish({"id": "resp_a", "status": "completed"}, ("in_progress",))
    await written(store)
    assert store.writes[0][0] - added < LAZY
    assert store.writes[0][1] == {"resp_a": [(0, 0, b"a")]}


async def test_events_someone_here_follows_are_never_lazy(store):
    signals = LocalSignals()
    sink = EventLog(store, signals, WritePolicy(interval=0.01, lazy_interval=60))
    with signals.watch(EVENTS, "resp_a") as wake:
        sink.append("resp_a", [(0, 0, b"a")], lazy=True)
        async with asyncio.timeout(5):
            await wake.wait()
    assert store.writes[0][1] == {"resp_a": [(0, 0, b"a")]}


async def test_flush_writes_lazy_events_at_once(sink, store):
    sink.append("resp_a", [(0, 0, b"a")], lazy=True)
    async with asyncio.timeout(LAZY / 2):
        await sink.flush("resp_a")
    assert store.writes[0][1] == {"resp_a": [(0, 0, b"a")]}


async def test_foreground_events_are_lazy_and_background_ones_are_not(tmp_path, monkeypatch):
    handed: list[tuple[str, bool]] = []
    real_append = EventLog.append

    def spy(self, response_id, runs, lazy=False):
        if runs:
            handed.append((response_id, lazy))
        real_append(self, response_id, runs, lazy)

    monkeypatch.setattr(EventLog, "append", spy)
    engine = ScriptedEngine(model_id="scripted", context_window=256, script=["Hel", "lo"])
    async with service_on(tmp_path / "s.sqlite3", engine) as service:
        events = await stream(service, input="hi")
        foreground = events[0]["response"]["id"]
        queued = await service.create("default", {"model": "scripted", "input": "hi", "background": True})
        async for _batch in service.follow("default", queued["id"]):
            pass
    assert {lazy for response_id, lazy in handed if response_id == foreground} == {True}
    assert {lazy for response_id, lazy in handed if response_id == queued["id"]} == {False}


async def test_a_flush_writes_nothing_for_a_response_with_nothing_pending(sink, store):
    sink.append("resp_a", [(0, 0, b"a")], lazy=True)
    async with asyncio.timeout(LAZY / 2):
        await sink.flush("resp_b")
    assert store.writes == []  # resp_a's lazy events still wait for their own time


async def test_a_flush_does_not_wait_for_what_others_hand_over_later(store):
    class SlowStore(RecordingStore):
        async def append_event_batches(self, batches, creates=(), finishes=()):
            await super().append_event_batches(batches, creates, finishes)
            await asyncio.sleep(0.02)

    slow = SlowStore()
    log = EventLog(slow, LocalSignals(), WritePolicy(interval=0.0, lazy_interval=0.0))
    stop = asyncio.Event()

    async def busy_stream():  # another response that keeps the writer busy, round after round
        number = 0
        while not stop.is_set():
            log.append("resp_busy", [(number, number, b"x")])
            number += 1
            await asyncio.sleep(0.005)

    streaming = asyncio.create_task(busy_stream())
    await asyncio.sleep(0.05)
    log.append("resp_a", [(0, 0, b"a")])
    async with asyncio.timeout(1):  # the busy stream never stops: waiting for the writer to idle would hang
        await log.flush("resp_a")
    assert any("resp_a" in batches for _, batches in slow.writes)
    stop.set()
    await streaming
    await log.flush_all()


async def test_a_flush_while_a_write_wakes_its_followers_returns(store):
    """PostgreSQL's NOTIFY is a round trip: a flush that comes while the log publishes what it
    has just written must not wait for a write that already happened."""
    class RoundTripSignals(LocalSignals):
        async def publish(self, channel, response_id):
            await asyncio.sleep(0.05)

    log = EventLog(store, RoundTripSignals(), WritePolicy(interval=0.0, lazy_interval=0.0))
    log.append("resp_a", [(0, 0, b"a")])
    await written(store)  # written; its wake-up is under way
    async with asyncio.timeout(1):
        await log.flush("resp_a")
