"""Sessions: many turns over one connection, for WebSocket mode and the typed Session RPC.

A client sends `response.create` messages; the session answers with the same stamped event
batches a streamed create gives, each tagged with its lane's `stream_id`.

- **Lanes.** Creates with the same `stream_id` (or none) run first in, first out; different
  lanes run at once. Without `stream_id` a connection therefore has one response in flight at a
  time, as the Open Responses spec requires; a create sent while one runs waits its turn.
- **Connection-local context.** Each lane's latest finished response keeps its whole context
  (history, input and output items) here, so a continuation by `previous_response_id` reads no
  store, and a `store: false` chain continues at all. Other ids hydrate from the store, as over
  HTTP. A continuation that fails (any error, or `response.failed`) evicts the id it named.
- **Bounds.** Lanes, waiting creates and outgoing batches per session are limited; a client
  that reads nothing for `slow_reader_seconds` while the outbox is full is dropped. After
  `max_seconds` the session refuses new creates, lets running ones finish, then ends with
  `websocket_connection_limit_reached`.
- **Ending.** `close()` (the client went away) cancels every lane: each running generation
  stops within a token, exactly as when an SSE client disconnects.

The session is its own error boundary per turn: a turn's failure becomes one error envelope on
its lane, and the session carries on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import re

from parley import metrics, tracing
from parley.errors import ApiError, ErrorKind, invalid, invalid_type, server_error
from parley.log import get_logger
from parley.service.turn_state import CONTINUABLE as TURN_CONTINUABLE

log = get_logger(__name__)

# OpenAI's ResponsesClientEventResponseCreate.stream_id.
STREAM_ID = re.compile(r"[A-Za-z0-9_.-]{1,256}")
# Outcomes whose context a later turn may continue from.
CONTINUABLE = frozenset(f"response.{status}" for status in TURN_CONTINUABLE)
LIMIT_REACHED = "websocket_connection_limit_reached"


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    max_lanes: int = 16  # lanes with work at once on one connection
    max_pending: int = 16  # creates waiting for their lane, over all lanes ...
    max_pending_bytes: int = 16 * 1024 * 1024  # ... and their size as received (one bigger one may wait alone)
    max_seconds: float = 3600.0  # a connection's life (the spec's 60 minutes)
    outbox_batches: int = 256  # event batches waiting for the client to read them
    slow_reader_seconds: float = 60.0


@dataclasses.dataclass
class Outgoing:
    """One thing the session sends: a batch of a lane's stream events (`encoded`: their JSON
    bytes, when the event log made them), or one error envelope (`encoded` None)."""

    stream_id: str | None
    events: list[dict]
    encoded: list[bytes] | None = None


def error_envelope(error: ApiError, stream_id: str | None = None, sequence_number: int | None = None) -> dict:
    """The spec's WebSocket error (`ResponseWsError`): the HTTP status beside OpenAI's error."""
    envelope = {"type": "error", "status": error.kind.http_status, **error.to_openai()}
    if sequence_number is not None:
        envelope["sequence_number"] = sequence_number
    if stream_id is not None:
        envelope["stream_id"] = stream_id
    return envelope


def _in_band(event: dict, stream_id: str | None) -> dict:
    """A stream's own `error` event (the store failed at the end) as the envelope."""
    error = ApiError(ErrorKind.UNAVAILABLE, event["message"], event.get("param"), event.get("code"))
    return error_envelope(error, stream_id, event.get("sequence_number"))


def _create_body(message: dict) -> dict:
    """The create body of a `response.create` message. The HTTP transport's own fields are
    refused where they ask for what a session cannot do: every response streams here (`stream:
    true` is what the OpenAI Agents SDK sends, and means just that), and background responses
    are created over HTTP. `generate: false` (OpenAI's warm-up) is checked here and honoured by
    the turn."""
    body = {key: value for key, value in message.items() if key not in ("type", "stream_id")}
    if body.pop("stream", True) is not True:
        raise invalid("'stream' must be true or left out on a WebSocket: every response streams its events.",
                      "stream", "unsupported_parameter")
    if "stream_options" in body:
        raise invalid("'stream_options' is not supported on a WebSocket.", "stream_options", "unsupported_parameter")
    if body.pop("background", False) is not False:
        raise invalid("Background responses are not supported on a WebSocket; create them over HTTP.",
                      "background", "unsupported_parameter")
    if not isinstance(body.get("generate", True), bool):
        raise invalid_type("generate", "a boolean", body["generate"])
    return {**body, "stream": True}  # what it is: logs and traces say so


class SessionEnded(Exception):
    """The client read nothing for too long while its outbox was full."""


@dataclasses.dataclass(eq=False)
class _Lane:
    stream_id: str | None
    waiting: collections.deque = dataclasses.field(default_factory=collections.deque)
    task: asyncio.Task | None = None
    latest: str | None = None  # the id of the last response this lane finished


class Session:
    """One connection's turns. The transport feeds `receive()` and drains `outgoing()`; it calls
    `close()` when the connection ends, however it ends."""

    def __init__(self, service, project: str, limits: SessionLimits = SessionLimits(), trace_metadata=()):
        self.service = service
        self.project = project
        self.limits = limits
        self.trace_metadata = tuple(trace_metadata)  # the connection's `traceparent`: each turn's span goes under it
        self._outbox: asyncio.Queue = asyncio.Queue(limits.outbox_batches)
        self._lanes: dict[str | None, _Lane] = {}
        self._contexts: dict[str, list[dict]] = {}  # response id -> its whole context, one per lane
        self._waiting = 0
        self._waiting_bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._expired = False
        self._ended = asyncio.Event()
        self._quiet = asyncio.Event()  # no lane has work
        self._quiet.set()
        self.end_reason: str | None = None  # why it ended: "closed", "slow reader" or the time limit
        self._closed = False
        self._expiry = asyncio.get_running_loop().call_later(limits.max_seconds, self._expire)
        metrics.SESSIONS.inc()

    # -- in --------------------------------------------------------------------------------------

    async def room(self) -> None:
        """Returns once another create may wait here. Transports call it before reading the next
        message, so that a client sending faster than its turns run is slowed down by its own
        connection (TCP backpressure), and what waits here stays bounded."""
        while not self._has_room():
            self._room.clear()
            await self._room.wait()

    def _has_room(self) -> bool:
        return self._waiting < self.limits.max_pending and (
            self._waiting == 0 or self._waiting_bytes < self.limits.max_pending_bytes)

    def receive(self, message, size: int = 0) -> None:
        """A client message, decoded from JSON (`size`: its length as received). Never raises:
        what is wrong becomes an error envelope (on the message's lane, when it names one)."""
        stream_id = None
        try:
            if not isinstance(message, dict):
                raise invalid("Each message must be a JSON object with a 'type'.", "type", "invalid_type")
            stream_id = message.get("stream_id")
            if stream_id is not None and not (isinstance(stream_id, str) and STREAM_ID.fullmatch(stream_id)):
                stream_id = None
                raise invalid("Invalid 'stream_id': expected 1 to 256 characters of A-Z, a-z, 0-9, '_', '.' "
                              "or '-'.", "stream_id", "invalid_value")
            kind = message.get("type")
            if kind != "response.create":  # response.steer is OpenAI's, for its GPT-6 family only
                raise invalid(f"Unknown message type {str(kind)[:64]!r}: this server accepts 'response.create'.",
                              "type", "unknown_event_type")
            self._enqueue(stream_id, message, size)
        except ApiError as error:
            self._post_now(Outgoing(stream_id, [error_envelope(error, stream_id)]))

    def refuse(self, error: ApiError) -> None:
        """A message the transport could not decode."""
        self._post_now(Outgoing(None, [error_envelope(error)]))

    def _enqueue(self, stream_id: str | None, message: dict, size: int) -> None:
        body = _create_body(message)
        if self._expired:
            raise invalid("This connection has reached its time limit; open a new one.", None, LIMIT_REACHED)
        if not self._has_room():  # only a transport that does not wait for room() gets here
            raise ApiError(ErrorKind.RATE_LIMITED, f"This connection already has {self._waiting} creates waiting; "
                           "wait for one to finish.", "stream_id", "websocket_queue_full")
        lane = self._lanes.get(stream_id)
        if lane is None:
            if len(self._lanes) >= self.limits.max_lanes:
                raise invalid(f"This WebSocket connection has reached its stream limit ({self.limits.max_lanes} "
                              "lanes with work at once).", "stream_id", "websocket_stream_limit_reached")
            lane = self._lanes[stream_id] = _Lane(stream_id)
            self._quiet.clear()
        lane.waiting.append((body, size))
        self._waiting += 1
        self._waiting_bytes += size
        if lane.task is None:
            lane.task = asyncio.create_task(self._work(lane), name=f"session-lane-{stream_id or 'default'}")

    # -- running a lane --------------------------------------------------------------------------

    async def _work(self, lane: _Lane) -> None:
        try:
            while lane.waiting:
                body = self._take(lane)
                await self._turn(lane, body)
                del body
        except SessionEnded:
            self.end("slow reader")
        finally:
            lane.task = None
            if not lane.waiting and self._lanes.get(lane.stream_id) is lane:
                del self._lanes[lane.stream_id]
                if not self._lanes:
                    self._quiet.set()
            if self._expired and not self._lanes:
                self._last_words()

    def _take(self, lane: _Lane) -> dict:
        body, size = lane.waiting.popleft()
        self._waiting -= 1
        self._waiting_bytes -= size
        if self._has_room():
            self._room.set()
        return body

    async def _turn(self, lane: _Lane, body: dict) -> None:
        previous = body.get("previous_response_id")
        previous = previous if isinstance(previous, str) else None
        outcome = None
        # One span per turn, as one per RPC over HTTP; the lane's task owns it (its context is its own).
        span = tracing.start_rpc("Session/response.create", self.trace_metadata, **{"parley.project": self.project},
                                 **({} if lane.stream_id is None else {"parley.stream_id": lane.stream_id}))
        try:
            generate = body.pop("generate", True)
            prepared = await self.service.prepare(self.project, body, known=self._contexts.get(previous),
                                                  keep_chain=True, generate=generate)
            async with contextlib.aclosing(self.service.run(prepared)) as batches:
                async for batch in batches:
                    outcome = batch[-1]["type"]
                    if outcome == "error":
                        await self._post(Outgoing(lane.stream_id, [_in_band(batch[-1], lane.stream_id)]))
                    else:
                        await self._post(Outgoing(lane.stream_id, batch, batch.encoded))
                    del batch
        except ApiError as error:
            await self._post(Outgoing(lane.stream_id, [error_envelope(error, lane.stream_id)]))
        except (SessionEnded, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("session.turn_crashed")
            await self._post(Outgoing(lane.stream_id, [error_envelope(server_error(), lane.stream_id)]))
        finally:
            span.set_attribute("parley.outcome", outcome or "refused")
            span.end()
        metrics.SESSION_TURNS.labels(outcome or "refused").inc()
        if outcome in CONTINUABLE and prepared.chain is not None:
            self._remember(lane, prepared.response["id"], prepared.chain + prepared.response["output"])
        elif previous is not None:  # the spec: a failed continuation evicts what it named
            self._contexts.pop(previous, None)

    def forget(self, response_id: str) -> None:
        """The response was deleted: no later turn here may continue from it."""
        self._contexts.pop(response_id, None)

    def _remember(self, lane: _Lane, response_id: str, context: list[dict]) -> None:
        """One context per lane, its latest; the one it replaces goes unless another lane's
        latest is that very response (a fork)."""
        replaced = lane.latest
        if replaced is not None and not any(other.latest == replaced for other in self._lanes.values()
                                            if other is not lane):
            self._contexts.pop(replaced, None)
        self._contexts[response_id] = context
        lane.latest = response_id
        while len(self._contexts) > self.limits.max_lanes:  # lanes that ended left theirs: oldest go
            self._contexts.pop(next(iter(self._contexts)))

    # -- out -------------------------------------------------------------------------------------

    async def _post(self, outgoing: Outgoing) -> None:
        try:
            await asyncio.wait_for(self._outbox.put(outgoing), self.limits.slow_reader_seconds)
        except TimeoutError:
            log.warning("session.slow_reader", waited_s=self.limits.slow_reader_seconds)
            raise SessionEnded from None

    def _post_now(self, outgoing: Outgoing) -> None:
        """For replies to a message (not a lane's stream): a client that floods the session with
        bad messages while reading nothing is dropped."""
        try:
            self._outbox.put_nowait(outgoing)
        except asyncio.QueueFull:
            log.warning("session.slow_reader", outbox=self._outbox.qsize())
            self.end("slow reader")

    async def outgoing(self):
        """What to send, in order, until the session ends."""
        ended = asyncio.create_task(self._ended.wait())
        try:
            while True:
                if self._outbox.empty() and self._ended.is_set():
                    return
                taken = asyncio.create_task(self._outbox.get())
                done, _ = await asyncio.wait((taken, ended), return_when=asyncio.FIRST_COMPLETED)
                if taken in done:
                    yield taken.result()
                    del taken
                    continue
                taken.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await taken
        finally:
            ended.cancel()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    @property
    def idle(self) -> bool:
        """Nothing runs or waits."""
        return not self._lanes

    async def finish(self) -> None:
        """The client will send nothing more: end once every lane's work is done."""
        await self._quiet.wait()
        self.end("finished")

    # -- the end ---------------------------------------------------------------------------------

    def _expire(self) -> None:
        self._expired = True
        log.info("session.time_limit", max_s=self.limits.max_seconds)
        for lane in self._lanes.values():  # creates not started yet are refused; running ones finish
            while lane.waiting:
                self._take(lane)
                self._post_now(Outgoing(lane.stream_id, [error_envelope(self._limit_error(), lane.stream_id)]))
        if not any(lane.task is not None for lane in self._lanes.values()):
            self._last_words()

    def _limit_error(self) -> ApiError:
        return invalid(f"This connection reached its limit of {self.limits.max_seconds:g} seconds; open a new one "
                       "(continue with previous_response_id where the response was stored).", None, LIMIT_REACHED)

    def _last_words(self) -> None:
        if not self._ended.is_set():
            self._post_now(Outgoing(None, [error_envelope(self._limit_error())]))
            self.end(LIMIT_REACHED)

    def end(self, reason: str) -> None:
        """No more turns; the transport closes the connection (`end_reason` says why)."""
        if not self._ended.is_set():
            self.end_reason = reason
            self._ended.set()

    async def close(self) -> None:
        """The connection is gone: stop every lane (their generations stop within a token)."""
        if self._closed:
            return
        self._closed = True
        metrics.SESSIONS.dec()
        self.end("closed")
        self._room.set()  # a transport waiting for room goes on, and finds the session ended
        self._expiry.cancel()
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, SessionEnded):
                await task
        self._lanes.clear()
        self._contexts.clear()
