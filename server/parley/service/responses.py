"""The one service behind both faces (typed gRPC and REST): a thin façade over its parts.

create = prepare (service/preparation.py: validate, assemble context, fit the prompt, admit,
open in the event log; raises ApiError before anything is sent) + run (service/generation.py:
engine steps to stamped events; never raises after the first event). Background responses run
as tasks of this replica (service/background.py); every stored stream is written, replayed and
followed by the event log (service/event_log.py); leases and retention are maintenance
(service/maintenance.py).
"""

from __future__ import annotations

import contextlib
import time
import weakref

from parley import metrics
from parley.engine.base import Engine
from parley.errors import ApiError, ErrorKind, engine_unavailable, invalid, not_found
from parley.service.admission import Admission
from parley.service.background import BackgroundWork
from parley.service.compaction import compacted_window
from parley.service.conversations import Conversations
from parley.service.event_log import DEFAULT_WRITE_POLICY, EventLog, WritePolicy
from parley.service.generation import Generation
from parley.service.includes import shape_stored
from parley.service.limits import RateLimits
from parley.service.maintenance import Maintenance
from parley.service.preparation import CompactFirst, PreparedResponse, Preparer
from parley.service.sealing import Sealer
from parley.service.sessions import Session, SessionLimits
from parley.service.turn_state import TurnStates
from parley.service.validation import check_body, item_list, page_bounds, validate_include
from parley.store.base import ResponseStore
from parley.store.signals import LocalSignals

# OpenAI's CompactResponseMethodPublicBody.
COMPACT_FIELDS = frozenset({"model", "input", "previous_response_id", "instructions", "prompt_cache_key",
                            "prompt_cache_retention", "prompt_cache_options", "service_tier"})
# OpenAI's TokenCountsBody, less `personality` (no such setting here: refused by name).
COUNT_FIELDS = frozenset({"model", "input", "previous_response_id", "tools", "text", "reasoning", "truncation",
                          "instructions", "conversation", "tool_choice", "parallel_tool_calls"})


class ResponsesService:
    """Every method that reads or changes a response takes the caller's project first: another
    project's responses read as absent (404), never as forbidden."""

    def __init__(self, engine: Engine, store: ResponseStore, *, signals: LocalSignals | None = None,
                 admission: Admission | None = None, limits: RateLimits | None = None,
                 replica_id: str = "local", lease_seconds: float = 30,
                 default_max_output_tokens: int = 1024, log_prompts: bool = False, follow_poll_seconds: float = 1.0,
                 sealer: Sealer | None = None, write_policy: WritePolicy = DEFAULT_WRITE_POLICY,
                 context_cache_bytes: int = 256 * 2**20):
        self.engine = engine
        self.store = store
        self.signals = signals or LocalSignals()
        self.events = EventLog(store, self.signals, write_policy, follow_poll_seconds)
        self.admission = admission or Admission(4, 64)
        self.limits = limits or RateLimits()
        self.turn_states = TurnStates(context_cache_bytes)
        self.preparer = Preparer(engine, store, self.events, self.admission, self.limits, replica_id=replica_id,
                                 lease_seconds=lease_seconds, default_max_output_tokens=default_max_output_tokens,
                                 log_prompts=log_prompts, sealer=sealer, turn_states=self.turn_states)
        self.generation = Generation(engine, store, self.events, log_prompts=log_prompts,
                                     shutting_down=lambda: self._shutting_down, turn_states=self.turn_states,
                                     sealer=sealer)
        self.background = BackgroundWork(self.generation, store, self.events, self.signals)
        self.maintenance = Maintenance(store, self.signals, replica_id=replica_id, lease_seconds=lease_seconds,
                                       running=lambda: self.generation.running)
        self.sealer = sealer
        self.conversations = Conversations(store, sealer)
        self.created_at = int(time.time())
        self._shutting_down = False
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()  # open ones, for forget()

    @property
    def models(self) -> list[dict]:
        return [{"id": self.engine.model_id, "object": "model", "created": self.created_at, "owned_by": "parley"}]

    # -- create -------------------------------------------------------------------------------

    async def prepare(self, project: str, body, *, known: list[dict] | None = None, keep_chain: bool = False,
                      generate: bool = True) -> PreparedResponse:
        """A create, validated and admitted (service/preparation.py); the keywords are a
        session's (service/sessions.py)."""
        if self._shutting_down:
            raise ApiError(ErrorKind.UNAVAILABLE, "The server is shutting down; retry on another replica.",
                           None, "server_shutting_down")
        health = self.engine.health()
        if not health.ok:
            raise engine_unavailable(health.detail)
        session = {"known": known, "keep_chain": keep_chain, "generate": generate}
        try:
            return await self.preparer.prepare(project, body, **session)
        except CompactFirst as signal:
            return await self.preparer.prepare(project, body, await self._compaction_of(project, body, signal.history),
                                               **session)

    async def _compaction_of(self, project: str, body: dict, history: list[dict]) -> tuple[dict, dict]:
        """context_management: a compaction run (not stored) over the history; its one item and
        its usage."""
        run = await self.preparer.prepare(project, {"model": body["model"], "store": False,
                                                    "input": [*history, {"type": "compaction_trigger"}]})
        response = await self.create_prepared(run)
        return response["output"][-1], response["usage"]

    def run(self, prepared: PreparedResponse):
        return self.generation.run(prepared)

    def open_session(self, project: str, limits: SessionLimits, trace_metadata=()) -> Session:
        """Many turns over one connection (WebSocket mode, the typed Session RPC)."""
        session = Session(self, project, limits, trace_metadata)
        self._sessions.add(session)
        return session

    async def create(self, project: str, body) -> dict:
        return await self.create_prepared(await self.prepare(project, body))

    async def create_prepared(self, prepared: PreparedResponse) -> dict:
        """Non-streaming: the queued document (background) or the finished one."""
        if prepared.params.background:
            return await self.background.start(prepared)
        return await self.generation.complete(prepared)

    async def events_of(self, prepared: PreparedResponse):
        """The event batches of a just-prepared streamed create: background ones are followed
        through the event log, so the client may drop its stream without stopping them."""
        if prepared.params.background:
            document = await self.background.start(prepared)
            return self.events.follow(document["id"])
        return self.generation.run(prepared)

    async def count_input_tokens(self, project: str, body) -> dict:
        """POST /v1/responses/input_tokens: the length of the prompt a create with these fields
        would give the engine, computed by the very code that builds it; nothing is stored."""
        check_body(body, COUNT_FIELDS)
        params = self.preparer.validate({**body, "model": body.get("model") or self.engine.model_id})
        prompt = await self.preparer.prompt(project, params)
        return {"object": "response.input_tokens", "input_tokens": len(prompt)}

    async def compact(self, project: str, body) -> dict:
        """POST /v1/responses/compact: a compaction run (service/compaction.py) that is not
        stored; the reply is the compacted window to send instead of the context."""
        check_body(body, COMPACT_FIELDS)
        window = body.get("input")
        if isinstance(window, str):
            window = [{"role": "user", "content": window}]
        if window is None or isinstance(window, list):  # anything else: validation names `input`
            window = [*(window or []), {"type": "compaction_trigger"}]
        prepared = await self.prepare(project, {**body, "model": body.get("model") or self.engine.model_id,
                                                "input": window, "store": False})
        response = await self.create_prepared(prepared)
        return {"id": response["id"], "object": "response.compaction", "created_at": response["created_at"],
                "output": compacted_window(prepared.context, response["output"][-1]), "usage": response["usage"]}

    # -- stored responses ---------------------------------------------------------------------

    async def follow(self, project: str, response_id: str, starting_after: int = -1, include: list[str] = ()):
        """The stored events of a response of `project` after `starting_after`, then the live
        ones until it ends (404 before anything is sent when it is not there)."""
        if include:  # replayed events are the bytes first sent: they cannot gain or lose parts
            raise invalid("include is not supported when streaming a stored response: its events replay exactly as "
                          "they were first sent. Retrieve it without stream to choose what it includes.",
                          "include", "unsupported_parameter")
        await self.get(project, response_id)
        async with contextlib.aclosing(self.events.follow(response_id, starting_after)) as batches:
            async for batch in batches:
                yield batch

    async def get(self, project: str, response_id: str, include: list[str] = ()) -> dict:
        """A stored response of `project`; `include` chooses its optional parts (includes.py)."""
        await self.events.flush(response_id)
        started = time.perf_counter()
        document = await self.store.get(response_id, project)
        metrics.STORE_READ_SECONDS.observe(time.perf_counter() - started)
        if document is None:
            raise not_found(f"Response with id '{response_id}' not found.", "response_id")
        return shape_stored(document, list(include), self.sealer)

    async def cancel(self, project: str, response_id: str) -> dict:
        return await self.background.cancel(project, response_id)

    async def delete(self, project: str, response_id: str) -> dict:
        await self.events.flush(response_id)
        if await self.store.get(response_id, project) is None:
            raise not_found(f"Response with id '{response_id}' not found.", "response_id")
        self.background.stop(response_id)
        if not await self.store.delete(response_id, project):
            raise not_found(f"Response with id '{response_id}' not found.", "response_id")
        self.turn_states.discard(project, response_id)  # others' go on their next use (tombstones)
        for session in list(self._sessions):  # a socket on this replica may hold it in memory
            if session.project == project:
                session.forget(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def list_input_items(self, project: str, response_id: str, *, limit: int | None, order: str | None,
                               after: str | None, before: str | None, include: list[str]) -> dict:
        await self.events.flush(response_id)
        limit, order = page_bounds(limit, order)
        validate_include(include)  # input items are text: no value adds anything to them
        page = await self.store.list_input_items(response_id, limit=limit, order=order, after=after, before=before,
                                                 project=project)
        if page is None:
            raise not_found(f"Response with id '{response_id}' not found.", "response_id")
        return item_list(page.items, page.has_more)

    # -- maintenance and shutdown -------------------------------------------------------------

    async def maintain(self, response_ttl_seconds: int = 0) -> None:
        """Renew this replica's leases, fail responses whose replica died, apply retention."""
        await self.maintenance.run_once(response_ttl_seconds)

    async def shutdown(self, grace: float) -> None:
        """Stop taking work; let background work finish within `grace`, then fail what is left."""
        self._shutting_down = True
        await self.background.shutdown(grace)
        await self.drain()

    async def drain(self) -> None:
        """Everything this replica handed to the event log so far is written."""
        await self.events.flush_all()
