"""Preparing a create request: everything that may still refuse it with an ApiError, before any
byte is sent.

validate -> assemble the context (the previous_response_id chain, sealed reasoning) -> render
and fit the prompt (truncation) -> lower the request to the engine's sampling parameters ->
admit (a generation slot or a place in the queue) -> open the response in the event log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import NamedTuple

from opentelemetry.trace import Span

from parley import metrics, tracing
from parley.engine.base import Engine, EngineDead, SamplingParams
from parley.engine.formats import tool_format
from parley.errors import ApiError, ErrorKind, engine_unavailable, invalid, not_found
from parley.ids import new_response_id
from parley.log import get_logger
from parley.service import compaction
from parley.service.admission import Admission, Ticket
from parley.service.event_log import EventLog, ResponseStream
from parley.service.events import ResponseBuilder, new_response
from parley.service.input_items import resolve_references
from parley.service.limits import Charge, RateLimits
from parley.service.prompts import Prompts
from parley.service.sealing import Sealer
from parley.service.tools import unknown_call_outputs
from parley.service.turn_state import TurnState, TurnStates
from parley.service.validation import CreateParams, validate_create
from parley.store.base import ChainBroken, ResponseStore

log = get_logger(__name__)

# OpenAI's code (a 400, as OpenAI answers it), on every transport; the WebSocket spec names it.
PREVIOUS_NOT_FOUND = "previous_response_not_found"


class Context(NamedTuple):
    history: list[dict]  # the conversation's or the chain's items, as stored
    items: list[dict]    # what the prompt is made of
    # The chain's tags, where this turn may leave a state for its continuation (None: it may not).
    tags: frozenset[str] | None = None
    kept: TurnState | None = None  # the previous response's state, when `items` continue its `seen`
    revision: int | None = None  # a conversation's, as of `history`


class CompactFirst(Exception):
    """context_management: the prompt is past its threshold, so the history is to be compacted
    (by a compaction run) before this create is prepared again with the result."""

    def __init__(self, history: list[dict]):
        super().__init__("compact first")
        self.history = history


@dataclasses.dataclass
class PreparedResponse:
    """A create request that was accepted: what the generation needs, nothing sent yet."""

    params: CreateParams
    builder: ResponseBuilder
    stream: ResponseStream
    prompt: list[int]
    sampling: SamplingParams
    ticket: Ticket
    project: str
    charge: Charge  # what the project's rate limits were charged; settled when it ends
    arrived_at: float  # time.perf_counter() when the request arrived (time to first token)
    span: Span | None  # the request's RPC span (traces), parent of the run's spans
    # A compaction run's context (its window is made of it); empty otherwise, so that a long
    # stream does not hold its whole history.
    context: list[dict] = dataclasses.field(default_factory=list)
    compacted: tuple[dict, dict] | None = None  # (compaction item, usage) that opens the output
    # For a session (service/sessions.py): what a continuation of this response starts from
    # before its output, as the store would give it (the chain's items, then this input); None
    # when not asked for, or when the response belongs to a conversation (its items live there).
    chain: list[dict] | None = None
    generate: bool = True  # False: a session's warm-up, which prepares state and generates nothing
    turn: TurnState | None = None  # what a continuation of this response starts from (service/turn_state.py)

    @property
    def response(self) -> dict:
        return self.builder.response


class Preparer:
    def __init__(self, engine: Engine, store: ResponseStore, events: EventLog, admission: Admission,
                 limits: RateLimits, *, replica_id: str, lease_seconds: float, default_max_output_tokens: int,
                 log_prompts: bool, sealer: Sealer | None, turn_states: TurnStates):
        self.engine = engine
        self.turn_states = turn_states
        # A Hugging Face tokenizer over a whole context takes milliseconds: rendered on a worker
        # thread, so that other streams go on (Engine.renders_off_loop; optional, default off).
        self._render_in_thread = getattr(engine, "renders_off_loop", False)
        self.store = store
        self.events = events
        self.admission = admission
        self.limits = limits
        self.replica_id = replica_id
        self.lease_seconds = lease_seconds
        self.default_max_output_tokens = default_max_output_tokens
        self.log_prompts = log_prompts
        self.sealer = sealer
        self.prompts = Prompts(engine, tool_format(engine.tool_format, native=getattr(engine, "native_tools", False),
                                                   efforts=getattr(engine, "reasoning_efforts", ())))

    async def prepare(self, project: str, body, compacted: tuple[dict, dict] | None = None, *,
                      known: list[dict] | None = None, keep_chain: bool = False,
                      generate: bool = True) -> PreparedResponse:
        """`compacted`: (compaction item, its run's usage) when context_management compacted
        the history first; the item opens the response's output. `known`: the chain's items
        of previous_response_id, when a session holds them (no store read); `keep_chain`: the
        prepared response carries its `chain`."""
        arrived_at = time.perf_counter()
        span = tracing.child("parley.prepare", tracing.rpc_span())
        try:
            prepared = await self._prepare(project, body, arrived_at, compacted, known, keep_chain, generate)
            span.set_attributes({"parley.prompt_tokens": len(prepared.prompt),
                                 "parley.response_id": prepared.response["id"]})
            return prepared
        except BaseException as failure:
            span.set_attribute("error.type", getattr(failure, "code", None) or type(failure).__name__)
            raise
        finally:
            span.end()

    def validate(self, body) -> CreateParams:
        return validate_create(body, [self.engine.model_id], reasoning_model=self.engine.reasoning_format != "none",
                               efforts=self.prompts.tool_format.efforts)

    async def context(self, project: str, params: CreateParams, compacted: dict | None = None,
                      known: list[dict] | None = None) -> Context:
        """The items the model sees, in order: the conversation or the previous_response_id
        chain (`known` when the caller holds it; `compacted`: a compaction item of it, from
        context_management), then the new input; references resolved, sealed reasoning and
        compactions opened."""
        await resolve_references(self.store, project, params.input_items)
        kept, tags, revision = None, frozenset(), None
        if params.conversation_id is not None:
            kept = await self._kept(project, params.conversation_id, vouched=False)
            if kept is not None:
                history, revision = kept.history, kept.revision
            else:
                found = await self.store.conversation_context(params.conversation_id, project)
                if found is None:
                    raise not_found(f"Conversation with id '{params.conversation_id}' not found.", "conversation")
                history, revision = found
        elif params.previous_response_id:
            kept = await self._kept(project, params.previous_response_id, vouched=known is not None)
            if kept is not None:
                history, tags = kept.history, kept.tags
            elif known is not None:  # a session's own: its responses' tags are not known here
                history, tags = known, None
            else:
                history, tags = await self._history(project, params.previous_response_id)
        else:
            history = []
        leading = [compacted] if compacted is not None else []
        items = history + leading + params.input_items
        # A chain's earlier turns were checked when they were made; a conversation's items may
        # have been added by the items API since (but not to a kept one: its revision would differ).
        problem = unknown_call_outputs(items, len(history) if params.conversation_id is None or kept else 0)
        if problem is not None:
            raise problem
        self._open_sealed_reasoning(params.input_items)
        new = [*kept.pending, *params.input_items] if kept is not None else ()
        if kept is not None and not leading and not any(item["type"] == "compaction" for item in new):
            # opened() and superseded() change nothing in `seen` that they did not already.
            return Context(history, [*kept.seen, *new], tags, kept, revision)
        items = compaction.superseded(compaction.opened(items, self.sealer, len(history) + len(leading)))
        return Context(history, items, None if leading else tags, None, revision)

    async def prompt(self, project: str, params: CreateParams) -> list[int]:
        """The prompt tokens the engine gets for `params`: its context with instructions and
        tools (or, for a compaction run, the request to summarise it), fitted to the window."""
        context = await self.context(project, params)
        return (await self._prompt_or_compact_first(params, context, may_compact=False))[0]

    async def _prompt_or_compact_first(self, params: CreateParams, context: Context,
                                       may_compact: bool) -> tuple[list[int], TurnState | None]:
        """The prompt, and the state a continuation may start from; or, under
        context_management, CompactFirst when the prompt is past its threshold (with none: when
        it would not fit, truncated or not). Nothing is charged, admitted or stored yet when it
        is raised."""
        compactable = (may_compact and params.compact_threshold is not None and not params.compact
                       and bool(context.history))
        try:
            tags = context.tags if params.store and self.turn_states.max_bytes and self.prompts.keeps(params) else None
            whole_of = (params, context.items, context.history, context.kept, tags, context.revision)
            # A kept state's continuation renders a turn's new messages only: on the loop. Without
            # message rendering it renders the whole prompt, which goes to a worker thread too.
            if self._render_in_thread and (context.kept is None or self.prompts.rendering is None):
                whole, turn = await asyncio.to_thread(self.prompts.whole, *whole_of)
            else:
                whole, turn = self.prompts.whole(*whole_of)
            if self._render_in_thread and not self.prompts.fits(params, len(whole)):
                prompt, dropped, turn = await asyncio.to_thread(self.prompts.fit, params, context.items, whole, turn)
            else:
                prompt, dropped, turn = self.prompts.fit(params, context.items, whole, turn)
        except ApiError as error:
            if compactable and error.code == "context_length_exceeded":
                raise CompactFirst(context.history) from None
            raise
        if compactable and (dropped or 0 < params.compact_threshold < len(prompt)):
            raise CompactFirst(context.history)
        if dropped:
            log.info("prompt.truncated", dropped_items=dropped)
        if self.log_prompts:  # opt-in only: prompt text never reaches logs by default
            log.debug("prompt.text", messages=[tuple(m) for m in self.prompts.messages(params, context.items)])
        return prompt, turn

    async def _prepare(self, project: str, body, arrived_at: float, compacted, known, keep_chain: bool,
                       generate: bool) -> PreparedResponse:
        params = self.validate(body)
        context = await self.context(project, params, compacted and compacted[0], known)
        try:
            prompt, turn = await self._prompt_or_compact_first(params, context, may_compact=compacted is None)
        except EngineDead as dead:  # rendering is the engine's (a remote engine's process may be gone)
            raise engine_unavailable(dead) from None
        default_budget = compaction.SUMMARY_TOKENS if params.compact else self.default_max_output_tokens
        max_tokens = min(params.max_output_tokens or default_budget, self.engine.context_window - len(prompt))
        sampling = dataclasses.replace(params.sampling(max_tokens), cache_scope=project)
        try:
            self.engine.check_constraint(sampling.constraint)
        except EngineDead as dead:
            raise engine_unavailable(dead) from None
        except ValueError as exc:
            where = "text.format.schema" if sampling.constraint.kind == "json_schema" else "tools"
            raise invalid(f"This server cannot enforce the schema in '{where}': {exc}", where,
                          "unsupported_schema") from None
        seal = self._sealer().seal if "reasoning.encrypted_content" in params.include else None
        builder = ResponseBuilder(new_response(params, new_response_id(params.previous_response_id), int(time.time())),
                                  logprobs=params.wants_logprobs, seal=seal,
                                  custom_tools=frozenset(f["name"] for f in params.functions if f.get("custom")))
        response_id = builder.response["id"]
        charge = self.limits.take(project, len(prompt) + max_tokens)
        try:
            ticket = self.admission.enter(project)
        except BaseException:
            charge.settle(0)
            raise
        try:
            if params.store:
                # A background response is durable before `queued` is returned: others may act on it.
                await self.events.open(builder.response, params.input_items, self.replica_id,
                                       time.time() + self.lease_seconds, durable=params.background, project=project)
        except BaseException:
            ticket.release()
            charge.settle(0)
            raise
        prepared = PreparedResponse(params, builder,
                                    self.events.stream(response_id, persist=params.store,
                                                       background=params.background),
                                    prompt, sampling, ticket, project, charge, arrived_at,
                                    tracing.rpc_span(), context.items if params.compact else [], compacted,
                                    [*context.history, *params.input_items]
                                    if keep_chain and params.conversation_id is None else None, generate, turn)
        log.info("response.prepared", response_id=response_id, project=project, prompt_tokens=len(prompt),
                 max_tokens=max_tokens, stream=params.stream, store=params.store, background=params.background)
        return prepared

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

    async def _kept(self, project: str, key: str, vouched: bool) -> TurnState | None:
        """The state this replica kept for continuing `key` (a response, or a conversation), if
        the store says it still holds: the response's chain is intact, the conversation's
        revision is the state's (`vouched`: a session holds that chain itself, and asks no store)."""
        state = self.turn_states.get(project, key)
        if state is not None and not vouched:
            if state.revision is None:  # written behind (durability `relaxed`), it may still be on its way
                await self.events.flush(key)
            if await (self.store.chain_intact(key, project, state.tags) if state.revision is None
                      else self._same_revision(project, key, state.revision)):
                state = dataclasses.replace(state, checked_at=time.time())
            else:
                self.turn_states.discard(project, key)
                state = None
        metrics.TURN_STATES.labels("miss" if state is None else "hit").inc()
        return state

    async def _same_revision(self, project: str, conversation_id: str, revision: int) -> bool:
        return await self.store.conversation_revision(conversation_id, project) == revision

    async def _history(self, project: str, response_id: str) -> tuple[list[dict], frozenset[str]]:
        """Input and output items of the whole chain ending at response_id, oldest first, in one
        store query (a response of another project reads as absent), and the chain's tags."""
        await self.events.flush(response_id)  # its final document may still be on its way
        try:
            chain = await self.store.chain_context(response_id, project)
        except ChainBroken as broken:
            raise invalid(f"Response '{broken.missing}' in the chain of '{response_id}' no longer exists.",
                          "previous_response_id", PREVIOUS_NOT_FOUND) from None
        if chain is None:
            raise invalid(f"Previous response with id '{response_id}' not found.", "previous_response_id",
                          PREVIOUS_NOT_FOUND)
        return chain
