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

import orjson
from opentelemetry.trace import Span

from parley import metrics, tracing
from parley.engine.base import ChatMessage, Engine, SamplingParams
from parley.engine.formats import tool_format
from parley.engine.segments import MessageRendering
from parley.errors import ApiError, ErrorKind, invalid, not_found
from parley.ids import new_response_id
from parley.log import get_logger
from parley.service import compaction
from parley.service.admission import Admission, Ticket
from parley.service.conversation import body_messages, extends, system_message, to_messages
from parley.service.event_log import EventLog, ResponseStream
from parley.service.events import ResponseBuilder, new_response
from parley.service.input_items import resolve_references
from parley.service.limits import Charge, RateLimits
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
        # The prompt message by message, where the engine's template allows it (engine/segments.py).
        self._rendering: MessageRendering | None = getattr(engine, "message_rendering", None)
        self._heads: dict[ChatMessage, list[int]] = {}  # first messages rendered (instructions and tools)
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
        self.tool_format = tool_format(engine.tool_format)

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
        return validate_create(body, [self.engine.model_id], reasoning_model=self.engine.reasoning_format != "none")

    async def context(self, project: str, params: CreateParams, compacted: dict | None = None,
                      known: list[dict] | None = None) -> Context:
        """The items the model sees, in order: the conversation or the previous_response_id
        chain (`known` when the caller holds it; `compacted`: a compaction item of it, from
        context_management), then the new input; references resolved, sealed reasoning and
        compactions opened."""
        await resolve_references(self.store, project, params.input_items)
        kept, tags = None, frozenset()
        if params.conversation_id is not None:
            history, tags = await self.store.conversation_items(params.conversation_id, project), None
            if history is None:
                raise not_found(f"Conversation with id '{params.conversation_id}' not found.", "conversation")
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
        # have been added by the items API since.
        problem = unknown_call_outputs(items, len(history) if params.conversation_id is None else 0)
        if problem is not None:
            raise problem
        self._open_sealed_reasoning(params.input_items)
        new = [*kept.pending, *params.input_items] if kept is not None else ()
        if kept is not None and not leading and not any(item["type"] == "compaction" for item in new):
            # opened() and superseded() change nothing in `seen` that they did not already.
            return Context(history, [*kept.seen, *new], tags, kept)
        items = compaction.superseded(compaction.opened(items, self.sealer, len(history) + len(leading)))
        return Context(history, items, None if leading or params.compact else tags)

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
            # A kept state's continuation renders a turn's new messages only: on the loop.
            if self._render_in_thread and context.kept is None:
                whole, turn = await asyncio.to_thread(self._whole, params, context)
            else:
                whole, turn = self._whole(params, context)
            if self._fits(params, whole):
                prompt, dropped = whole, 0
            elif self._render_in_thread:
                prompt, dropped = await asyncio.to_thread(self._fit, params, context.items, whole)
            else:
                prompt, dropped = self._fit(params, context.items, whole)
        except ApiError as error:
            if compactable and error.code == "context_length_exceeded":
                raise CompactFirst(context.history) from None
            raise
        if compactable and (dropped or 0 < params.compact_threshold < len(prompt)):
            raise CompactFirst(context.history)
        if dropped:
            log.info("prompt.truncated", dropped_items=dropped)
        if self.log_prompts:  # opt-in only: prompt text never reaches logs by default
            log.debug("prompt.text", messages=[(m.role, m.content) for m in self._messages(params, context.items)])
        return prompt, turn

    async def _prepare(self, project: str, body, arrived_at: float, compacted, known, keep_chain: bool,
                       generate: bool) -> PreparedResponse:
        params = self.validate(body)
        context = await self.context(project, params, compacted and compacted[0], known)
        prompt, turn = await self._prompt_or_compact_first(params, context, may_compact=compacted is None)
        default_budget = compaction.SUMMARY_TOKENS if params.compact else self.default_max_output_tokens
        max_tokens = min(params.max_output_tokens or default_budget, self.engine.context_window - len(prompt))
        sampling = dataclasses.replace(params.sampling(max_tokens), cache_scope=project)
        try:
            self.engine.check_constraint(sampling.constraint)
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
                                    if keep_chain and params.conversation_id is None else None, generate,
                                    turn if params.store else None)
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

    async def _kept(self, project: str, response_id: str, vouched: bool) -> TurnState | None:
        """The state this replica kept for continuing `response_id`, if the store says that
        its chain is intact (`vouched`: a session holds that chain itself, and asks no store)."""
        state = self.turn_states.get(project, response_id)
        if state is not None and not vouched:
            if await self.store.chain_intact(response_id, project, state.tags):
                state = dataclasses.replace(state, checked_at=time.time())
            else:
                self.turn_states.discard(project, response_id)
                state = None
        metrics.TURN_STATES.labels("miss" if state is None else "hit").inc()
        return state

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

    def _messages(self, params: CreateParams, items: list[dict]):
        """The chat messages of a request. Every tool is shown, even under tool_choice `none`
        (the grammar forbids calling them): the prompt's prefix stays the same from turn to
        turn, and so does what the KV cache can reuse."""
        if params.compact:
            return compaction.summary_messages(items, params.functions, self.tool_format,
                                               self.engine.reasoning_format)
        return to_messages(params.instructions, items, params.functions, self.tool_format, self.engine.reasoning_format,
                           params.reasoning_turns)

    def _whole(self, params: CreateParams, context: Context) -> tuple[list[int], TurnState | None]:
        """The prompt of the whole context (truncation is _fit's), and, for a stored chain's
        turn, the state its continuation starts from: made from the previous response's state
        when there is one that this turn's items continue, else from the prompt just rendered."""
        if context.tags is None or not params.store or not self.turn_states.max_bytes or (
                self.engine.reasoning_format == "think" and params.reasoning_turns == "current_turn"):
            return self.engine.render_prompt(self._messages(params, context.items)), None
        system = system_message(params.instructions, params.functions, self.tool_format)
        chain = [*context.history, *params.input_items]
        input_bytes = len(orjson.dumps(params.input_items))
        if context.kept is not None:
            continued = self._continued(system, context, chain, input_bytes)
            if continued is not None:
                return continued
        body, end = body_messages(context.items, self.tool_format, self.engine.reasoning_format)
        prompt = self.engine.render_prompt([system, *body] if system else body)
        tokens, first_length = self._tokens_of(prompt, system, body)
        item_bytes = (context.kept.item_bytes if context.kept is not None else len(orjson.dumps(context.history)))
        return prompt, TurnState(chain, [], context.items, end, body[0] if body else None, tokens, first_length,
                                 context.tags, item_bytes + input_bytes, time.time())

    def _continued(self, system: ChatMessage | None, context: Context, chain: list[dict],
                   input_bytes: int) -> tuple[list[int], TurnState] | None:
        """The prompt and state of a turn whose items continue the kept state's: only the new
        items become messages, only those are rendered. None where that would not give what
        rendering the whole context gives."""
        kept, rendering = context.kept, self._rendering
        new = context.items[len(kept.seen):]
        if rendering is None or kept.tokens is None or not extends(kept.end, new):
            return None
        messages, end = body_messages(new, self.tool_format, self.engine.reasoning_format)
        try:
            added = [rendering.render_message(message, False) for message in messages]
            first, first_length = kept.first, kept.first_length
            if first is None and messages:
                first, first_length = messages[0], len(added[0])
            tokens = kept.tokens + [token for rendered in added for token in rendered]
            prompt = self._prompt_of(system, first, first_length, tokens)
        except ValueError:  # a message the template cannot render on its own
            return None
        return prompt, TurnState(chain, [], context.items, end, first, tokens, first_length, kept.tags,
                                 kept.item_bytes + input_bytes, kept.checked_at)

    def _prompt_of(self, system: ChatMessage | None, first: ChatMessage | None, first_length: int,
                   tokens: list[int]) -> list[int]:
        """The prompt of messages whose renderings as later messages are `tokens`: the first
        rendered as the first instead."""
        rendering = self._rendering
        if system is not None:
            head, body = self._head(system), tokens
        elif first is not None:
            head, body = self._head(first), tokens[first_length:]
        else:
            head, body = [], tokens
        return head + body + rendering.generation_prompt()

    def _head(self, message: ChatMessage) -> list[int]:
        """A first message's rendering: the same instructions and tools every turn, so kept."""
        head = self._heads.get(message)
        if head is None:
            head = self._rendering.render_message(message, True)
            if len(self._heads) >= 64:
                self._heads.pop(next(iter(self._heads)))
            self._heads[message] = head
        return head

    def _tokens_of(self, prompt: list[int], system: ChatMessage | None,
                   body: list[ChatMessage]) -> tuple[list[int] | None, int]:
        """From a whole prompt, the renderings of `body` as later messages (and how many tokens
        the first's is); None when the engine does not render message by message."""
        rendering = self._rendering
        if rendering is None:
            return None, 0
        try:
            generation = rendering.generation_prompt()
            end = len(prompt) - len(generation)
            later = rendering.render_message(body[0], False) if body else []
            head = self._head(system if system is not None else body[0]) if system or body else []
            if prompt[end:] != generation or prompt[:len(head)] != head:
                return None, 0
            if system is not None:
                return prompt[len(head):end], len(later)
            return later + prompt[len(head):end], len(later)
        except ValueError:
            return None, 0

    def _fits(self, params: CreateParams, prompt: list[int]) -> bool:
        needed = params.max_output_tokens or (compaction.SUMMARY_TOKENS if params.compact else 1)
        return len(prompt) + needed <= self.engine.context_window

    def _fit(self, params: CreateParams, items: list[dict], whole: list[int]) -> tuple[list[int], int]:
        """The prompt, given the `whole` context's. When it does not fit and truncation is
        `auto` (or this is a compaction run, which exists to shrink a context), keep the longest
        run of newest items that fits: found by doubling it from the newest item, then
        bisecting, so a long history costs a few renders of about the window's size, not one per
        dropped item."""
        needed = params.max_output_tokens or (compaction.SUMMARY_TOKENS if params.compact else 1)

        def newest(count: int) -> list[int]:
            return self.engine.render_prompt(self._messages(params, items[len(items) - count:]))

        def fits(prompt: list[int]) -> bool:
            return self._fits(params, prompt)

        prompt = whole
        if fits(prompt):
            return prompt, 0
        if (params.truncation == "auto" or params.compact) and len(items) > 1:
            kept, kept_prompt, size = 0, None, 1
            while size < len(items):
                candidate = newest(size)
                if not fits(candidate):
                    break
                kept, kept_prompt, size = size, candidate, size * 2
            too_many = min(size, len(items))
            while too_many - kept > 1:
                middle = (kept + too_many) // 2
                candidate = newest(middle)
                if fits(candidate):
                    kept, kept_prompt = middle, candidate
                else:
                    too_many = middle
            if kept_prompt is not None:
                return kept_prompt, len(items) - kept
            prompt = newest(1)
        raise invalid(
            f"The input ({len(prompt)} tokens) plus max_output_tokens ({needed}) exceeds the model's "
            f"context window of {self.engine.context_window} tokens. Shorten the input, or set "
            "truncation to 'auto' to drop the oldest items.", "input", "context_length_exceeded")
