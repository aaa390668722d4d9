"""Running a generation: engine steps in, stamped event batches out.

A run never raises after its first event: failures become `response.failed`. However it ends
(finished, failed, the client gone, the server shutting down), it releases its generation slot,
closes the engine's stream (which stops the engine within a token) and hands the final document
to the event log.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import orjson

from parley import metrics, tracing
from parley.engine.base import Engine, EngineError, Finished
from parley.engine.formats import (
    CallArguments,
    CallEnd,
    CallStart,
    OutputParser,
    Reasoning,
    Segment,
    Text,
    tool_format,
)
from parley.errors import ApiError, ErrorKind
from parley.log import get_logger
from parley.service.compaction import compaction_item
from parley.service.event_log import EventBatch, EventLog
from parley.service.events import UNACKNOWLEDGED_MESSAGE, ResponseBuilder, error_event, json_copy
from parley.service.preparation import PreparedResponse
from parley.service.sealing import Sealer
from parley.service.turn_state import CONTINUABLE, TurnStates
from parley.store.base import ACTIVE, ResponseStore, stored_output

log = get_logger(__name__)

# `cancelled` is allowed: a cancel marks the row first, then the runner stores the partial output.
FINALIZABLE = (*ACTIVE, "cancelled")
SHUTDOWN_MESSAGE = "The server shut down before the response finished; retry the request."


def segment_events(builder: ResponseBuilder, segments: list[Segment], logprobs) -> list[dict]:
    """The events of parsed output segments; a token's logprobs go with the first text it produced."""
    events: list[dict] = []
    for segment in segments:
        match segment:
            case Text(text):
                events += builder.text_delta(text, logprobs)
                logprobs = ()
            case Reasoning(text):
                events += builder.reasoning_delta(text)
            case CallStart(name):
                events += builder.call_start(name)
            case CallArguments(text):
                events += builder.call_arguments(text)
            case CallEnd():
                events += builder.close("completed")
    return events


class Generation:
    def __init__(self, engine: Engine, store: ResponseStore, events: EventLog, *, log_prompts: bool,
                 shutting_down: Callable[[], bool], turn_states: TurnStates, sealer: Sealer | None = None):
        self.engine = engine
        self.turn_states = turn_states
        self.sealer = sealer
        self.store = store
        self.events = events
        self.log_prompts = log_prompts
        self._shutting_down = shutting_down
        self.tool_format = tool_format(engine.tool_format)
        self.running: set[str] = set()  # stored responses whose run has not ended: their leases are renewed

    async def run(self, prepared: PreparedResponse):
        """Yield the response's events in batches (each stamped, in order): one batch per engine
        step, so events that are ready together travel together. Persisted as they go."""
        builder, stream = prepared.builder, prepared.stream
        response_id = builder.response["id"]
        generation = None
        finished = False
        handed_over = False  # the final document went to the event log
        acknowledged = False  # ... and is durable: the terminal event may leave
        if prepared.params.store:
            self.running.add(response_id)
        if not stream.started:
            created = stream.emit(builder.created())
            try:
                with _spanned("parley.store.ack", prepared):
                    await stream.acknowledge()  # the row is durable before the client sees its id
            except BaseException as exc:  # nothing was sent: the client gets the error itself
                prepared.ticket.release()
                prepared.charge.settle(0)
                self.running.discard(response_id)
                if prepared.params.store:  # whatever reached the store must not stay in progress
                    if isinstance(exc, Exception):
                        builder.fail("server_error", "The response could not be stored.")
                    else:
                        builder.cancel()
                    self.events.finish(builder.response, FINALIZABLE)
                raise
            yield created
            del created  # a suspended stream must not pin what it already sent
        engine_span = None
        try:
            with _spanned("parley.queue", prepared):
                await prepared.ticket.start()
            engine_span = tracing.child("parley.engine", prepared.span, **{"parley.response_id": response_id})
            started = builder.started()
            if started and prepared.params.store:
                await self.store.update(builder.response)
            if started:
                yield stream.emit(started)
            if prepared.compacted is not None:  # context_management compacted the history first
                yield stream.emit(builder.add_item(json_copy(prepared.compacted[0])))
            compacting = prepared.params.compact
            parser = OutputParser(self.tool_format, self.engine.reasoning_format,
                                  tools=bool(prepared.params.callable_tools) and prepared.params.tool_mode != "none"
                                  and not compacting)
            # Plain text with no logprobs is the common case: a step's deltas become events at once.
            plain = parser.plain and not builder.logprobs and not compacting
            summary: list[str] = []
            to_events = _summary_collector(summary) if compacting else segment_events
            reasoning_tokens = 0
            generation = (self.engine.generate(prepared.prompt, prepared.sampling) if prepared.generate
                          else _warm_up(len(prepared.prompt)))
            result: Finished | None = None
            first_token_at = None
            async for step in generation:
                if isinstance(step, Finished):
                    result = step
                    continue
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    metrics.TIME_TO_FIRST_TOKEN.observe(first_token_at - prepared.arrived_at)
                if plain:
                    texts = [delta.text for delta in step if delta.text] if isinstance(step, list) \
                        else [step.text] if step.text else []
                    if texts:
                        yield stream.emit(builder.text_deltas(texts), plain_texts=texts)
                    continue
                batch: list[dict] = []
                for delta in step if isinstance(step, list) else (step,):
                    was_reasoning = parser.reasoning
                    segments = list(parser.feed(delta.text)) if delta.text else []
                    if was_reasoning or parser.reasoning:  # <think> markup counts as reasoning too
                        reasoning_tokens += delta.tokens
                    batch += to_events(builder, segments, delta.logprobs)
                if batch:
                    yield stream.emit(batch)
            if result is None:
                raise RuntimeError("engine ended without a Finished event")
            tail = to_events(builder, list(parser.finish()), ())
            if compacting:  # the summary, whole and sealed, is the run's one output item
                tail += builder.add_item(compaction_item("".join(summary), self.sealer))
            compacted_usage = prepared.compacted[1] if prepared.compacted is not None else {}
            closing = stream.emit(tail + builder.finish(
                result.reason, result.input_tokens + compacted_usage.get("input_tokens", 0),
                result.output_tokens + compacted_usage.get("output_tokens", 0), result.cached_tokens,
                result.cache_write_tokens, reasoning_tokens, prepared.generate))
            finished = handed_over = True
            if first_token_at is not None and result.output_tokens > 1:
                # One observation per response (its mean): one per token cost the hot path
                # about a fifth of a core at 80k tokens/s.
                metrics.INTER_TOKEN.observe((time.perf_counter() - first_token_at) / (result.output_tokens - 1))
            engine_span.set_attributes({"parley.input_tokens": result.input_tokens,
                                        "parley.output_tokens": result.output_tokens,
                                        "parley.finish_reason": result.reason})
            engine_span.end()
            engine_span = None
            await self._hand_over(prepared)
            acknowledged = True
            self._keep_turn(prepared)
            yield closing
            log.info("response.finished", response_id=response_id, status=builder.response["status"],
                     input_tokens=result.input_tokens, output_tokens=result.output_tokens,
                     cached_tokens=result.cached_tokens)
            if self.log_prompts:
                log.debug("response.text", response_id=response_id, output=builder.response["output"])
        except Exception as exc:  # after the first event, failures are in-band
            log.exception("response.failed", response_id=response_id, error=type(exc).__name__)
            if not finished:
                finished = handed_over = True
                # An engine's own report says what happened; anything else is a bug, not shown.
                message = f"The model engine failed: {exc}" if isinstance(exc, EngineError) \
                    else "The model failed while generating the response."
                closing = stream.emit(builder.fail("server_error", message))
                with contextlib.suppress(ApiError):  # the store failed too: said below
                    await self._hand_over(prepared)
                    acknowledged = True
                if acknowledged:
                    yield closing
            # A terminal event leaves only once durable. One that could not be made so is not
            # sent: the client is told instead (the stored response fails when its lease lapses).
            if not acknowledged:
                stream.sequencer.withdraw(closing)
                yield stream.emit([error_event("store_unavailable", UNACKNOWLEDGED_MESSAGE)], persist=False)
        finally:
            if engine_span is not None:  # it ended early (failed, cancelled)
                engine_span.end()
            prepared.ticket.release()
            if generation is not None:
                await generation.aclose()
            if not finished:
                if self._shutting_down():
                    stream.emit(builder.fail("server_error", SHUTDOWN_MESSAGE))
                    log.warning("response.failed", response_id=response_id, reason="server shutting down")
                else:
                    builder.cancel()
                    log.info("response.cancelled", response_id=response_id)
            if prepared.params.store and not handed_over:
                self.events.finish(builder.response, FINALIZABLE)
            self.running.discard(response_id)
            _account(prepared)

    def _keep_turn(self, prepared: PreparedResponse) -> None:
        """A stored response that may be continued leaves, durable, the state its continuation
        starts from (service/turn_state.py)."""
        response, conversation = prepared.builder.response, prepared.params.conversation_id
        if prepared.turn is not None and response["status"] in CONTINUABLE:
            # What the store gives the next turn: a chain reads the output items it keeps as
            # rows; a conversation is joined by every output item.
            output = response["output"] if conversation else [item for item in response["output"] if stored_output(item)]
            state = prepared.turn.finished(response["id"], output, len(orjson.dumps(output)))
            if conversation is not None:
                self.turn_states.put(prepared.project, conversation, state, replaces=None)
            else:
                self.turn_states.put(prepared.project, response["id"], state,
                                     replaces=prepared.params.previous_response_id)

    async def _hand_over(self, prepared: PreparedResponse) -> None:
        """The final document to the log, durable with every event before it, before the
        terminal event may leave."""
        if prepared.params.store:
            self.events.finish(prepared.builder.response, FINALIZABLE)
        with _spanned("parley.store.ack", prepared):
            await prepared.stream.acknowledge()

    async def complete(self, prepared: PreparedResponse) -> dict:
        """Run to the end and return the final Response document (non-streaming create)."""
        final: EventBatch | None = None
        batches = self.run(prepared)
        try:
            async for batch in batches:
                final = batch
        finally:
            await batches.aclose()
        await self.events.flush(prepared.response["id"])
        event = final[-1]
        if event["type"] == "error":
            raise ApiError(ErrorKind.UNAVAILABLE, event["message"], None, event["code"])
        if event["type"] == "response.failed":
            raise ApiError(ErrorKind.SERVER_ERROR, event["response"]["error"]["message"], None, "server_error")
        return event["response"]


async def _warm_up(prompt_tokens: int):
    """A session's `generate: false`: the request's state is prepared (and stored), no output."""
    yield Finished("stop", prompt_tokens, 0)


def _summary_collector(summary: list[str]):
    """For a compaction run: its text is gathered, not streamed (segment_events' signature)."""
    def collect(builder: ResponseBuilder, segments: list[Segment], logprobs) -> list[dict]:
        summary.extend(segment.text for segment in segments if isinstance(segment, Text))
        return []
    return collect


@contextlib.contextmanager
def _spanned(name: str, prepared: PreparedResponse):
    span = tracing.child(name, prepared.span)
    try:
        yield span
    finally:
        span.end()


def _account(prepared: PreparedResponse) -> None:
    """A run's end in the metrics, and its rate-limit charge settled to what it used."""
    response = prepared.builder.response
    usage = response.get("usage") or {}
    prepared.charge.settle(usage.get("total_tokens", prepared.charge.taken))
    metrics.RESPONSE_SECONDS.observe(time.perf_counter() - prepared.arrived_at)
    metrics.RESPONSES.labels(prepared.project, response["status"]).inc()
    if usage:
        metrics.INPUT_TOKENS.labels(prepared.project).inc(usage["input_tokens"])
        metrics.OUTPUT_TOKENS.labels(prepared.project).inc(usage["output_tokens"])
        metrics.CACHED_TOKENS.labels(prepared.project).inc(usage["input_tokens_details"]["cached_tokens"])
