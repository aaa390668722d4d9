"""The event log: every response's stream events, from the moment they are stamped until they
are read back, owned by one component.

- `ResponseStream.emit` stamps sequence numbers (through the one Sequencer), encodes each event
  once (the same bytes go to the client and to the store) and compacts a run of plain text deltas
  into one stored line.
- `EventLog` batches what every running response of this replica hands over (new rows, event
  runs, final documents) into one store transaction, and wakes followers on every replica after
  each write. *When* it writes is `WritePolicy`'s business, and nobody else's.
- `read` and `follow` replay a stored stream, expanding compacted lines back to the very events
  that were streamed. A read flushes only the response it reads.

Stores keep plain rows: (response id, first sequence number, last, the events as JSON lines);
service/stored_events.py is what those lines hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import orjson

from parley import metrics
from parley.errors import ApiError, ErrorKind
from parley.log import get_logger
from parley.service.events import Sequencer, json_copy
from parley.service.stored_events import TextRun, decode_rows, encoded
from parley.store.base import ACTIVE, EventRun, ResponseStore
from parley.store.signals import EVENTS, LocalSignals

log = get_logger(__name__)

def store_unavailable() -> ApiError:
    return ApiError(ErrorKind.UNAVAILABLE, "The response store could not be written; retry the request.", None,
                    "store_unavailable")


# -- writing ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WritePolicy:
    """When what the log is handed reaches the store.

    Acknowledged means durable (`acknowledge_durably`): a response's first events (they carry
    its id) and its final document with the terminal event are written, in a transaction shared
    with whatever else is pending (group commit), before the client may see them; see
    `ResponseStream.acknowledge`. Events in between may wait: prompt writes (new rows, a
    background response's events, events someone on this replica follows) go within `interval`;
    lazy ones (a foreground stream's events, which its own stream already carries) may wait
    `lazy_interval`, or until anything else is written: at a model's pace of a token or two per
    write, each write's thread wake-ups cost more CPU than the whole token's serving path, CPU
    the engine beside it needs. A crash mid-stream may lose such a tail; the response then ends
    `failed` by lease recovery, and no client was told otherwise.
    """

    interval: float = 0.02
    lazy_interval: float = 0.25
    acknowledge_durably: bool = True

    def delay(self, lazy: bool) -> float:
        return self.lazy_interval if lazy else self.interval


DEFAULT_WRITE_POLICY = WritePolicy()


class EventBatch(list):
    """Stamped events that were ready together, with each event's JSON bytes in `encoded`."""

    __slots__ = ("encoded",)


class ResponseStream:
    """One response's events as they are produced: stamped, encoded once, handed to the log.
    Without a log (store=false) nothing is persisted."""

    def __init__(self, response_id: str, log: EventLog | None, lazy: bool):
        self.response_id = response_id
        self.sequencer = Sequencer()
        self._log = log
        self._lazy = lazy

    @property
    def started(self) -> bool:
        return self.sequencer.next > 0

    async def acknowledge(self) -> None:
        """Return once everything emitted so far (and the final document, once handed over) is
        written: await it before a client may see what these events acknowledge. Without a log
        (store=false) nothing is kept, and nothing is waited for."""
        if self._log is not None and self._log.policy.acknowledge_durably:
            await self._log.flush(self.response_id)

    def emit(self, events: list[dict], plain_texts: list[str] | None = None, *, persist: bool = True) -> EventBatch:
        """`plain_texts`: the last events are plain text deltas of these texts, stored as one
        line with the deltas just before them, as long as those are not written yet.
        `persist=False`: stamped and sent, not stored (an error about the store itself)."""
        batch = EventBatch(events)
        first = self.sequencer.stamp(batch)
        batch.encoded = list(map(orjson.dumps, batch))
        if self._log is None or not batch or not persist:
            return batch
        runs = []
        others = len(batch) - len(plain_texts or ())
        if others:
            runs.append((first, first + others - 1, b"\n".join(batch.encoded[:others])))
        if plain_texts:
            deltas = batch[others]
            if others or not self._log.extend_text_run(self.response_id, deltas, plain_texts):
                runs.append((deltas["sequence_number"], first + len(batch) - 1, TextRun(deltas, list(plain_texts))))
        self._log.append(self.response_id, runs, lazy=self._lazy)
        return batch


class EventLog:
    def __init__(self, store: ResponseStore, signals: LocalSignals, policy: WritePolicy | None = None,
                 follow_poll_seconds: float = 1.0):
        self.store = store
        self.signals = signals
        self.policy = policy or WritePolicy()
        self.follow_poll_seconds = follow_poll_seconds
        self._pending: dict[str, list[EventRun]] = {}
        self._creates: list[tuple] = []
        self._finishes: dict[str, tuple[dict, tuple[str, ...]]] = {}
        self._writing: set[str] = set()  # responses in the write under way
        self._rounds_started = 0  # store transactions begun by _write
        self._rounds_done = 0
        self._round_waiters: list[tuple[int, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None

    # -- producing ----------------------------------------------------------------------------

    async def open(self, response: dict, input_items: list[dict], owner: str, lease_until: float, *,
                   durable: bool, project: str) -> None:
        """A new response's row. `durable`: written before this returns (others may act on it at
        once); else written ahead of its events in the next write, so a stream's first byte never
        waits for the disk."""
        if durable:
            await self.store.create(response, input_items, owner=owner, lease_until=lease_until, project=project)
            return
        # A snapshot: the row must be the document as created, not as it is when the write runs.
        self._creates.append((json_copy(response), input_items, owner, lease_until, project))
        self.append(response["id"], [])

    def stream(self, response_id: str, *, persist: bool, background: bool) -> ResponseStream:
        # A background response's followers read its stream from the store: its events go promptly.
        return ResponseStream(response_id, self if persist else None, lazy=not background)

    def extend_text_run(self, response_id: str, first: dict, texts: list[str]) -> bool:
        """Add deltas (`first` the first of their events) to the response's last pending run if it
        is a text run of the same content part that they continue; False when it is not."""
        pending = self._pending.get(response_id)
        if not pending or not isinstance(pending[-1][2], TextRun):
            return False
        run = pending[-1][2]
        if (run.first["item_id"], run.first["content_index"]) != (first["item_id"], first["content_index"]) \
                or run.last + 1 != first["sequence_number"]:
            return False
        run.texts += texts
        pending[-1] = (pending[-1][0], run.last, run)
        return True

    def append(self, response_id: str, runs: list[EventRun], lazy: bool = False) -> None:
        self._pending.setdefault(response_id, []).extend(runs)
        lazy = lazy and not self.signals.watched(EVENTS, response_id)
        self._schedule(self.policy.delay(lazy))

    def finish(self, response: dict, expected: tuple[str, ...]) -> None:
        """The final document, written after the response's events if its stored status is in
        `expected`. The document must not change any more (its run has ended)."""
        self._finishes[response["id"]] = (response, expected)
        self._schedule(self.policy.delay(False))

    def _schedule(self, delay: float) -> None:
        if self._task is not None:
            return  # the running write goes on with what arrives meanwhile
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._timer is not None:
            if self._timer.when() <= due:
                return
            self._timer.cancel()
        self._timer = loop.call_at(due, self._start)

    def _start(self) -> None:
        self._timer = None
        self._write_now()

    async def _write(self) -> None:
        try:
            while self._pending or self._finishes:
                batches, self._pending = self._pending, {}
                creates, self._creates = self._creates, []
                finishes, self._finishes = self._finishes, {}
                self._writing = batches.keys() | finishes.keys()
                self._rounds_started += 1
                failure = None
                started = time.perf_counter()
                try:
                    await self.store.append_event_batches(
                        [(rid, encoded(runs)) for rid, runs in batches.items() if runs], creates=creates,
                        finishes=list(finishes.values()))
                except Exception as exc:
                    # Streams that wait for nothing go on; what failed to persist cannot be resumed:
                    # say so loudly. Those waiting to acknowledge are told (503 store_unavailable).
                    failure = exc
                    log.exception("events.write_failed", responses=list(self._writing),
                                  events=sum(run[1] - run[0] + 1 for runs in batches.values() for run in runs),
                                  finished=len(finishes))
                finally:
                    metrics.STORE_WRITE_SECONDS.observe(time.perf_counter() - started)
                    written, self._writing = self._writing, set()
                    self._round_done(failure)
                for response_id in written:
                    await self.signals.publish(EVENTS, response_id)
        finally:
            self._writing = set()
            self._task = None

    def _round_done(self, failure: BaseException | None) -> None:
        self._rounds_done += 1
        waiting = []
        for target, future in self._round_waiters:
            if target > self._rounds_done:
                waiting.append((target, future))
            elif not future.done():
                if failure is not None and target == self._rounds_done:
                    future.set_exception(store_unavailable())
                else:
                    future.set_result(None)
        self._round_waiters = waiting

    def _write_now(self) -> None:
        if self._task is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._task = asyncio.create_task(self._write())

    async def flush(self, response_id: str) -> None:
        """Return once everything of `response_id` handed over so far has been written; raise
        ApiError (503, `store_unavailable`) if that write failed. Writes of what others hand over
        later are not waited for."""
        if response_id in self._pending or response_id in self._finishes:
            target = self._rounds_started + 1  # the next transaction takes it
        elif response_id in self._writing:
            target = self._rounds_started
        else:
            return
        if target <= self._rounds_done:
            return
        future = asyncio.get_running_loop().create_future()
        self._round_waiters.append((target, future))
        self._write_now()
        await future

    async def flush_all(self) -> None:
        """Everything handed over so far is written (shutdown, tests)."""
        while self._task is not None or self._pending or self._finishes:
            self._write_now()
            await self._wait(self._task)

    @staticmethod
    async def _wait(task: asyncio.Task) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(task)

    # -- reading ------------------------------------------------------------------------------

    async def read(self, response_id: str, starting_after: int = -1) -> list[dict]:
        """The stored events of `response_id` after `starting_after`, everything handed over included."""
        await self.flush(response_id)
        return decode_rows(await self.store.event_rows(response_id, starting_after), starting_after)

    async def follow(self, response_id: str, starting_after: int = -1):
        """Stored events after `starting_after`, then live ones until the response ends; in
        batches, as they were read."""
        cursor = starting_after
        await self.flush(response_id)
        with self.signals.watch(EVENTS, response_id) as wake:
            while True:
                wake.clear()
                batch = decode_rows(await self.store.event_rows(response_id, cursor), cursor)
                if batch:
                    cursor = batch[-1]["sequence_number"]
                    yield batch
                document = await self.store.get(response_id)
                if document is None:
                    return
                if document["status"] not in ACTIVE:
                    # The final document is written after the final events: one last read.
                    batch = decode_rows(await self.store.event_rows(response_id, cursor), cursor)
                    if batch:
                        yield batch
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=self.follow_poll_seconds)
