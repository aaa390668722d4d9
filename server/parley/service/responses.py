"""The one service pipeline behind both faces (typed gRPC and REST).

create = prepare (validate, load history, render and fit the prompt, admit, persist; raises
ApiError before anything is sent) + run (generate and yield stamped events; never raises after
the first event: failures become `response.failed`). Background responses run as tasks of
this replica; clients follow them through the store (`follow`), so a dropped stream never
stops a background generation, and any replica can serve the stream, a cancel, or a GET.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import orjson

from parley.engine.base import Engine, Finished, SamplingParams
from parley.engine.formats import OutputParser
from parley.errors import ApiError, ErrorKind, invalid, not_found
from parley.ids import new_id
from parley.log import get_logger
from parley.service.admission import Admission, Ticket
from parley.service.conversation import to_messages
from parley.service.events import ResponseBuilder, Sequencer, expired_lease_failure, json_copy, new_response
from parley.service.sealing import Sealer
from parley.service.tools import build_constraint, unknown_call_outputs
from parley.service.validation import INCLUDE_VALUES, CreateParams, validate_create
from parley.store.base import ACTIVE, EventRun, ResponseStore, text_run_line
from parley.store.signals import CANCEL, EVENTS, LocalSignals

log = get_logger(__name__)

FINALIZABLE = (*ACTIVE, "cancelled")
SHUTDOWN_MESSAGE = "The server shut down before the response finished; retry the request."


class EventSink:
    """Persists what every running response of this replica produces (new rows, events, final
    documents) in one transaction per `interval`: the cost of storing does not grow with the
    number of streams, and no token or finish waits for the disk.

    What is handed over is written at most `interval` later, in the order it was handed over
    (a row before its events, events before the final document), and followers on every
    replica are woken after each write. Events handed over as `lazy` (a foreground stream's,
    which its own stream already carries, while nobody here follows it) may wait up to
    `lazy_interval`, or until anything else is written: at a model's pace of a token or two
    per write, each write's thread wake-ups cost more CPU than the whole token's serving path,
    CPU the engine beside it needs.
    """

    def __init__(self, store: ResponseStore, signals: LocalSignals, interval: float = 0.02,
                 lazy_interval: float = 0.25):
        self.store = store
        self.signals = signals
        self.interval = interval
        self.lazy_interval = lazy_interval
        self._pending: dict[str, list[EventRun]] = {}
        self._creates: list[tuple] = []
        self._finishes: dict[str, tuple[dict, tuple[str, ...]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None

    def create(self, response: dict, input_items: list[dict], owner: str, lease_until: float) -> None:
        """A new response's row, written ahead of its events in the sink's next transaction, so
        the first byte of a stream never waits for the disk."""
        # A snapshot: the row must be the document as created, not as it is when the write runs.
        self._creates.append((json_copy(response), input_items, owner, lease_until))
        self.add(response["id"], [])

    def add(self, response_id: str, runs: list[EventRun], lazy: bool = False) -> None:
        self._pending.setdefault(response_id, []).extend(runs)
        lazy = lazy and not self.signals.watched(EVENTS, response_id)
        self._schedule(self.lazy_interval if lazy else self.interval)

    def finish(self, response: dict, expected: tuple[str, ...]) -> None:
        """The final document, written after the response's events if its stored status is in
        `expected`. The document must not change any more (its run has ended)."""
        self._finishes[response["id"]] = (response, expected)
        self._schedule(self.interval)

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
        self._task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending or self._finishes:
                batches, self._pending = self._pending, {}
                creates, self._creates = self._creates, []
                finishes, self._finishes = self._finishes, {}
                try:
                    await self.store.append_event_batches(
                        [(rid, runs) for rid, runs in batches.items() if runs], creates=creates,
                        finishes=list(finishes.values()))
                except Exception:
                    # The streams go on; what failed to persist cannot be resumed: say so loudly.
                    log.exception("events.write_failed", responses=list(batches.keys() | finishes.keys()),
                                  events=sum(run[1] - run[0] + 1 for runs in batches.values() for run in runs),
                                  finished=len(finishes))
                    raise
                for response_id in batches.keys() | finishes.keys():
                    await self.signals.publish(EVENTS, response_id)
        finally:
            self._task = None

    async def flush(self, response_id: str | None = None) -> None:
        """Return once everything of `response_id` (None: of every response) handed over so far
        has been written, or has failed to be (failures are logged by the write itself)."""
        while self._task is not None:
            await self._wait(self._task)
        waiting = (response_id in self._pending or response_id in self._finishes) if response_id is not None \
            else bool(self._pending or self._finishes)
        if waiting:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._task = asyncio.create_task(self._flush())
            await self._wait(self._task)

    @staticmethod
    async def _wait(task: asyncio.Task) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(task)


class EventBatch(list):
    """Stamped events that were ready together, with each event's JSON bytes in `encoded`."""

    __slots__ = ("encoded",)


@dataclasses.dataclass
class PreparedResponse:
    params: CreateParams
    builder: ResponseBuilder
    sequencer: Sequencer
    prompt: list[int]
    sampling: SamplingParams
    ticket: Ticket
    sink: EventSink | None  # None: store=false, nothing is persisted

    @property
    def response(self) -> dict:
        return self.builder.response

    def emit(self, events: list[dict], plain_texts: list[str] | None = None) -> "EventBatch":
        """Stamp sequence numbers and encode each event once, for the stream and the store.
        `plain_texts`: the last events are plain text deltas of these texts, stored as one line."""
        batch = EventBatch(events)
        first = self.sequencer.stamp(batch)
        batch.encoded = list(map(orjson.dumps, batch))
        if self.sink is not None and batch:
            lines = batch.encoded
            if plain_texts:
                lines = lines[:-len(plain_texts)] + [text_run_line(batch[-len(plain_texts)], plain_texts)]
            # A background response's followers read its stream from the store: it goes promptly.
            self.sink.add(self.response["id"], [(first, first + len(batch) - 1, b"\n".join(lines))],
                          lazy=not self.params.background)
        return batch


class ResponsesService:
    def __init__(self, engine: Engine, store: ResponseStore, *, signals: LocalSignals | None = None,
                 admission: Admission | None = None, replica_id: str = "local", lease_seconds: float = 30,
                 default_max_output_tokens: int = 1024, log_prompts: bool = False, follow_poll_seconds: float = 1.0,
                 sealer: Sealer | None = None):
        self.engine = engine
        self.store = store
        self.signals = signals or LocalSignals()
        self.admission = admission or Admission(4, 64)
        self.replica_id = replica_id
        self.lease_seconds = lease_seconds
        self.default_max_output_tokens = default_max_output_tokens
        self.log_prompts = log_prompts
        self.follow_poll_seconds = follow_poll_seconds
        self.sealer = sealer
        self.sink = EventSink(store, self.signals)
        self.created_at = int(time.time())
        self._background: dict[str, asyncio.Task] = {}
        self._shutting_down = False

    @property
    def models(self) -> list[dict]:
        return [{"id": self.engine.model_id, "object": "model", "created": self.created_at, "owned_by": "parley"}]

    # -- create -------------------------------------------------------------------------------

    async def prepare(self, body) -> PreparedResponse:
        if self._shutting_down:
            raise ApiError(ErrorKind.UNAVAILABLE, "The server is shutting down; retry on another replica.",
                           None, "server_shutting_down")
        params = validate_create(body, [self.engine.model_id])
        history = await self._history(params.previous_response_id) if params.previous_response_id else []
        items = history + params.input_items
        problem = unknown_call_outputs(items)
        if problem is not None:
            raise problem
        self._open_sealed_reasoning(params.input_items)
        prompt, dropped = self._fit(params, items)
        if dropped:
            log.info("prompt.truncated", dropped_items=dropped)
        if self.log_prompts:  # opt-in only: prompt text never reaches logs by default
            log.debug("prompt.text", messages=[(m.role, m.content)
                                               for m in to_messages(params.instructions, items, self._shown(params))])
        window_left = self.engine.context_window - len(prompt)
        max_tokens = min(params.max_output_tokens or self.default_max_output_tokens, window_left)
        logprobs = "message.output_text.logprobs" in params.include
        sampling = SamplingParams(
            max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
            constraint=build_constraint(params.tool_mode, params.callable_tools, params.parallel_tool_calls,
                                        params.text["format"]),
            top_logprobs=(params.top_logprobs or 0) if logprobs else None)
        seal = self._sealer().seal if "reasoning.encrypted_content" in params.include else None
        builder = ResponseBuilder(new_response(params, new_id("resp"), int(time.time())), logprobs=logprobs, seal=seal)
        ticket = self.admission.enter()
        sink = None
        try:
            if params.store:
                lease = time.time() + self.lease_seconds
                if params.background:  # durable before `queued` is returned: others may act on it
                    await self.store.create(builder.response, params.input_items, owner=self.replica_id,
                                            lease_until=lease)
                else:
                    self.sink.create(builder.response, params.input_items, self.replica_id, lease)
                sink = self.sink
        except BaseException:
            ticket.release()
            raise
        prepared = PreparedResponse(params, builder, Sequencer(), prompt, sampling, ticket, sink)
        log.info("response.prepared", response_id=builder.response["id"], prompt_tokens=len(prompt),
                 max_tokens=max_tokens, stream=params.stream, store=params.store, background=params.background)
        return prepared

    @staticmethod
    def _shown(params: CreateParams) -> list[dict]:
        """The tools the model is told about: none under tool_choice none, else every tool."""
        return [] if params.tool_mode == "none" else params.tools

    def _sealer(self) -> Sealer:
        if self.sealer is None:
            raise ApiError(ErrorKind.INVALID_REQUEST, "Encrypted reasoning is not configured on this server.",
                           "include", "unsupported_value")
        return self.sealer

    def _open_sealed_reasoning(self, items: list[dict]) -> None:
        """Reasoning sent back encrypted must be ours and intact (stateless multi-turn)."""
        for index, item in enumerate(items):
            if item["type"] == "reasoning" and item.get("encrypted_content"):
                item["content"] = self._sealer().open(item["encrypted_content"], f"input[{index}].encrypted_content")

    async def _history(self, response_id: str) -> list[dict]:
        """Input and output items of the whole chain ending at response_id, oldest first."""
        await self.drain()
        chain: list[tuple[list[dict], list[dict]]] = []
        current: str | None = response_id
        while current is not None:
            document = await self.store.get(current)
            inputs = await self.store.input_items(current) if document else None
            if document is None or inputs is None:
                if current == response_id:
                    raise not_found(f"Previous response with id '{response_id}' not found.", "previous_response_id")
                raise not_found(f"Response '{current}' in the chain of '{response_id}' no longer exists.",
                                "previous_response_id")
            chain.append((inputs, document["output"]))
            current = document.get("previous_response_id")
        items: list[dict] = []
        for inputs, outputs in reversed(chain):
            items.extend(inputs)
            items.extend(outputs)
        return items

    def _fit(self, params: CreateParams, items: list[dict]) -> tuple[list[int], int]:
        """Render the prompt; with truncation=auto drop the oldest items until it fits."""
        needed = params.max_output_tokens or 1
        dropped = 0
        while True:
            prompt = self.engine.render_prompt(to_messages(params.instructions, items, self._shown(params)))
            if len(prompt) + needed <= self.engine.context_window:
                return prompt, dropped
            if params.truncation != "auto" or len(items) <= 1:
                raise invalid(
                    f"The input ({len(prompt)} tokens) plus max_output_tokens ({needed}) exceeds the model's "
                    f"context window of {self.engine.context_window} tokens. Shorten the input, or set "
                    "truncation to 'auto' to drop the oldest items.", "input", "context_length_exceeded")
            items = items[1:]
            dropped += 1

    async def run(self, prepared: PreparedResponse):
        """Yield the response's events in batches (each a list, stamped, in order): one batch per
        engine step, so events that are ready together travel together. Persisted as they go."""
        builder = prepared.builder
        response_id = builder.response["id"]
        generation = None
        finished = False
        try:
            if prepared.sequencer.next == 0:
                yield prepared.emit(builder.created())
            await prepared.ticket.start()
            started = builder.started()
            if started and prepared.params.store:
                await self.store.update(builder.response)
            if started:
                yield prepared.emit(started)
            parser = OutputParser(self.engine.tool_format, self.engine.reasoning_format,
                                  tools=bool(prepared.params.callable_tools) and prepared.params.tool_mode != "none")
            # Plain text with no logprobs is the common case: a step's deltas become events at once.
            plain = parser.plain and not builder.logprobs
            reasoning_tokens = 0
            generation = self.engine.generate(prepared.prompt, prepared.sampling)
            result: Finished | None = None
            async for step in generation:
                if isinstance(step, Finished):
                    result = step
                    continue
                if plain:
                    texts = [delta.text for delta in step if delta.text] if isinstance(step, list) \
                        else [step.text] if step.text else []
                    if texts:
                        yield prepared.emit(builder.text_deltas(texts), plain_texts=texts)
                    continue
                batch: list[dict] = []
                for delta in step if isinstance(step, list) else (step,):
                    was_reasoning = parser.reasoning
                    segments = list(parser.feed(delta.text)) if delta.text else []
                    if was_reasoning or parser.reasoning:  # <think> markup counts as reasoning too
                        reasoning_tokens += delta.tokens
                    batch += self._segment_events(builder, segments, delta.logprobs)
                if batch:
                    yield prepared.emit(batch)
            if result is None:
                raise RuntimeError("engine ended without a Finished event")
            tail = self._segment_events(builder, list(parser.finish()), ())
            closing = tail + builder.finish(result.reason, result.input_tokens, result.output_tokens,
                                            result.cached_tokens, result.cache_write_tokens, reasoning_tokens)
            finished = True
            yield prepared.emit(closing)
            log.info("response.finished", response_id=response_id, status=builder.response["status"],
                     input_tokens=result.input_tokens, output_tokens=result.output_tokens,
                     cached_tokens=result.cached_tokens)
            if self.log_prompts:
                log.debug("response.text", response_id=response_id, output=builder.response["output"])
        except Exception as exc:  # after the first event, failures are in-band
            log.exception("response.failed", response_id=response_id, error=type(exc).__name__)
            finished = True
            yield prepared.emit(builder.fail("server_error", "The model failed while generating the response."))
        finally:
            prepared.ticket.release()
            if generation is not None:
                await generation.aclose()
            if not finished:
                if self._shutting_down:
                    prepared.emit(builder.fail("server_error", SHUTDOWN_MESSAGE))
                    log.warning("response.failed", response_id=response_id, reason="server shutting down")
                else:
                    builder.cancel()
                    log.info("response.cancelled", response_id=response_id)
            if prepared.sink is not None:
                # `cancelled` is allowed: a cancel marks the row first, then the runner stores the partial output.
                prepared.sink.finish(builder.response, FINALIZABLE)

    @staticmethod
    def _segment_events(builder: ResponseBuilder, segments, logprobs) -> list[dict]:
        events: list[dict] = []
        for kind, value in segments:
            if kind == "text":
                events += builder.text_delta(value, logprobs)
                logprobs = ()  # a token's logprobs belong to the first text it produced
            elif kind == "reasoning":
                events += builder.reasoning_delta(value)
            elif kind == "call":
                events += builder.call_start(value)
            elif kind == "args":
                events += builder.call_arguments(value)
            else:  # "end"
                events += builder.close("completed")
        return events

    async def drain(self) -> None:
        """Everything this replica handed to the store so far is written."""
        await self.sink.flush()

    async def complete(self, prepared: PreparedResponse) -> dict:
        """Run to the end and return the final Response document (non-streaming create)."""
        final = None
        batches = self.run(prepared)
        try:
            async for batch in batches:
                final = batch[-1]
        finally:
            await batches.aclose()
        await self.drain()
        if final["type"] == "response.failed":
            raise ApiError(ErrorKind.SERVER_ERROR, final["response"]["error"]["message"], None, "server_error")
        return final["response"]

    async def create(self, body) -> dict:
        return await self.create_prepared(await self.prepare(body))

    async def create_prepared(self, prepared: PreparedResponse) -> dict:
        """Non-streaming: the queued document (background) or the finished one."""
        if prepared.params.background:
            return await self.start_background(prepared)
        return await self.complete(prepared)

    # -- background ---------------------------------------------------------------------------

    async def start_background(self, prepared: PreparedResponse) -> dict:
        """Persist `response.created`/`queued`, start the generation task, return the queued document."""
        response_id = prepared.response["id"]
        snapshot = json_copy(prepared.emit(prepared.builder.created())[0]["response"])
        await self.sink.flush(response_id)
        task = asyncio.create_task(self._run_background(prepared), name=f"background:{response_id}")
        self._background[response_id] = task
        task.add_done_callback(lambda _: self._background.pop(response_id, None))
        return snapshot

    async def _run_background(self, prepared: PreparedResponse) -> None:
        response_id = prepared.response["id"]
        with self.signals.watch(CANCEL, response_id) as cancelled:
            events = self.run(prepared)
            runner = asyncio.ensure_future(self._consume(events))
            waiter = asyncio.ensure_future(cancelled.wait())
            try:
                await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not runner.done():
                    log.info("response.cancel_received", response_id=response_id)
                    runner.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await runner
            finally:
                waiter.cancel()
                if not runner.done():
                    runner.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await runner

    @staticmethod
    async def _consume(events) -> None:
        try:
            async for _ in events:
                pass
        finally:
            await events.aclose()

    async def cancel(self, response_id: str) -> dict:
        await self.drain()
        document = await self.store.get(response_id)
        if document is None:
            raise not_found(f"Response with id '{response_id}' not found.", "response_id")
        if not document.get("background"):
            raise invalid("Only responses created with background=true can be cancelled.", "response_id",
                          "invalid_request")
        if document["status"] == "cancelled":
            return document
        if document["status"] not in ACTIVE:
            raise ApiError(ErrorKind.CONFLICT, f"Cannot cancel a response whose status is '{document['status']}'.",
                           "response_id", "response_already_finished")
        with self.signals.watch(EVENTS, response_id) as written:
            document, changed = await self.store.cancel(response_id)
            if not changed:  # it finished while we looked
                return await self.cancel(response_id) if document["status"] == "cancelled" else document
            await self.signals.publish(CANCEL, response_id)
            # Wait briefly for the runner (here or on another replica) to store the partial output.
            local = self._background.get(response_id)
            with contextlib.suppress(asyncio.TimeoutError):
                if local is not None:
                    await asyncio.wait_for(asyncio.shield(local), timeout=5)
                    await self.drain()
                else:
                    written.clear()
                    await asyncio.wait_for(written.wait(), timeout=5)
        log.info("response.cancelled", response_id=response_id, by="request")
        return await self.store.get(response_id) or document

    # -- following a stored stream ------------------------------------------------------------

    async def follow(self, response_id: str, starting_after: int = -1):
        """Stored events after `starting_after`, then live ones until the response ends; in
        batches, as they were read."""
        cursor = starting_after
        with self.signals.watch(EVENTS, response_id) as wake:
            while True:
                wake.clear()
                batch = await self.store.events(response_id, cursor)
                if batch:
                    cursor = batch[-1]["sequence_number"]
                    yield batch
                document = await self.store.get(response_id)
                if document is None:
                    return
                if document["status"] not in ACTIVE:
                    # The final document is written after the final events: one last read.
                    batch = await self.store.events(response_id, cursor)
                    if batch:
                        yield batch
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=self.follow_poll_seconds)

    # -- stored responses ---------------------------------------------------------------------

    async def get(self, response_id: str) -> dict:
        await self.drain()
        document = await self.store.get(response_id)
        if document is None:
            raise not_found(f"Response with id '{response_id}' not found.", "response_id")
        return document

    async def delete(self, response_id: str) -> dict:
        await self.drain()
        task = self._background.get(response_id)
        if task is not None:
            task.cancel()
        if not await self.store.delete(response_id):
            raise not_found(f"Response with id '{response_id}' not found.", "response_id")
        return {"id": response_id, "object": "response", "deleted": True}

    async def list_input_items(self, response_id: str, *, limit: int | None, order: str | None,
                               after: str | None, before: str | None, include: list[str]) -> dict:
        await self.drain()
        limit = 20 if limit is None else limit
        if not 1 <= limit <= 100:
            raise invalid(f"Invalid 'limit': {limit}. Expected a value between 1 and 100.", "limit", "invalid_value")
        order = order or "desc"
        if order not in ("asc", "desc"):
            raise invalid(f"Invalid 'order': {order!r}. Supported values are: 'asc' and 'desc'.", "order",
                          "invalid_value")
        for index, value in enumerate(include):
            if value not in INCLUDE_VALUES:
                raise invalid(f"Invalid value: {value!r} for include.", f"include[{index}]", "invalid_value")
        page = await self.store.list_input_items(response_id, limit=limit, order=order, after=after, before=before)
        if page is None:
            raise not_found(f"Response with id '{response_id}' not found.", "response_id")
        return {
            "object": "list",
            "data": page.items,
            "first_id": page.items[0]["id"] if page.items else None,
            "last_id": page.items[-1]["id"] if page.items else None,
            "has_more": page.has_more,
        }

    # -- maintenance and shutdown -------------------------------------------------------------

    async def maintain(self, response_ttl_seconds: int = 0) -> None:
        """Renew this replica's leases, fail responses whose replica died, apply retention."""
        now = time.time()
        await self.store.renew_leases(self.replica_id, now + self.lease_seconds)
        for response_id in await self.store.recover_expired(now, expired_lease_failure):
            log.warning("response.lease_expired", response_id=response_id)
            await self.signals.publish(EVENTS, response_id)
        if response_ttl_seconds > 0:
            deleted = await self.store.delete_finished_before(now - response_ttl_seconds)
            if deleted:
                log.info("retention.deleted", responses=deleted, ttl_s=response_ttl_seconds)

    async def shutdown(self, grace: float) -> None:
        """Stop taking work; let background work finish within `grace`, then fail what is left."""
        self._shutting_down = True
        running = list(self._background.values())
        if running:
            log.info("shutdown.draining", background=len(running), grace_s=grace)
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        await self.drain()
