"""Prompts from contexts: rendered whole, continued from a chain's kept state, fitted to the window.

A context becomes chat messages (service/conversation.py) and the engine renders them. For a
stored chain's turn the result also leaves the state its continuation starts from
(service/turn_state.py). Where the engine renders message by message (engine/segments.py), a
continuation turns only its new items into messages and renders only those, and truncation
(`truncation: "auto"`) measures the newest items from the kept renderings' lengths instead of
rendering them: a turn's cost stays that of its new items, however long the chain. Every shortcut
gives exactly what rendering the whole context gives; where one cannot (a cut inside items that
make one message and would render otherwise apart, a message the template cannot render on its
own), the whole is rendered.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from bisect import bisect_right
from collections.abc import Callable

import orjson

from parley.engine.base import ChatMessage, Engine
from parley.engine.formats import ToolFormat
from parley.errors import invalid
from parley.service import compaction
from parley.service.conversation import body_messages, extends, system_message, to_messages
from parley.service.turn_state import TurnState
from parley.service.validation import CreateParams

# A context rendered whole is also measured message by message (so that its continuation may be
# truncated from lengths) up to this many messages; a longer one is measured when first truncated.
MEASURED_AT_ONCE = 256


class Whole(Exception):
    """A shortcut does not apply here: render the whole context."""


class Prompts:
    def __init__(self, engine: Engine, tool_format: ToolFormat):
        self.engine = engine
        self.tool_format = tool_format
        self.rendering = getattr(engine, "message_rendering", None)
        self._heads: dict[ChatMessage, list[int]] = {}  # first messages rendered (instructions and tools)
        self._heads_lock = threading.Lock()  # whole() may run on worker threads (Engine.renders_off_loop)

    def messages(self, params: CreateParams, items: list[dict]) -> list[ChatMessage]:
        """The chat messages of a request. Every tool is shown, even under tool_choice `none`
        (the grammar forbids calling them): the prompt's prefix stays the same from turn to
        turn, and so does what the KV cache can reuse."""
        if params.compact:
            return compaction.summary_messages(items, params.functions, self.tool_format,
                                               self.engine.reasoning_format)
        return to_messages(params.instructions, items, params.functions, self.tool_format, self.engine.reasoning_format,
                           params.reasoning_turns, params.effort)

    def keeps(self, params: CreateParams) -> bool:
        """Whether a turn of `params` may leave a state (the rest is the caller's to say)."""
        return not params.compact and not (self.engine.reasoning_format != "none"
                                           and params.reasoning_turns == "current_turn")

    # -- the whole context ------------------------------------------------------------------------

    def whole(self, params: CreateParams, items: list[dict], history: list[dict], kept: TurnState | None,
              tags: frozenset[str] | None, revision: int | None = None) -> tuple[list[int], TurnState | None]:
        """The prompt of the whole context (truncation is fit's), and, given the chain's `tags`,
        the state its continuation starts from (`revision`: a conversation's, as of `history`):
        made from the previous response's state `kept` when `items` continue it, else from the
        prompt just rendered."""
        if tags is None:
            return self.engine.render_prompt(self.messages(params, items)), None
        system = system_message(params.instructions, params.functions, self.tool_format, params.effort)
        chain = [*history, *params.input_items]
        input_bytes = len(orjson.dumps(params.input_items))
        if kept is not None:
            try:
                return self._continued(system, items, kept, chain, input_bytes)
            except Whole:
                pass
        body = body_messages(items, self.tool_format, self.engine.reasoning_format)
        prompt = self.engine.render_prompt([system, *body.messages] if system else body.messages)
        tokens, first_length, ends = self._tokens_of(prompt, system, body.messages)
        item_bytes = kept.item_bytes if kept is not None else len(orjson.dumps(history))
        return prompt, TurnState(chain, [], items, body.end, body.messages[0] if body.messages else None, tokens,
                                 first_length, body.starts, ends, tags, item_bytes + input_bytes, time.time(),
                                 revision)

    def _continued(self, system: ChatMessage | None, items: list[dict], kept: TurnState, chain: list[dict],
                   input_bytes: int) -> tuple[list[int], TurnState]:
        """Only the new items become messages, only those are rendered."""
        new = items[len(kept.seen):]
        if self.rendering is None or kept.tokens is None or not extends(kept.end, new):
            raise Whole
        body = body_messages(new, self.tool_format, self.engine.reasoning_format)
        added = self._later(body.messages)
        first, first_length = kept.first, kept.first_length
        if first is None and body.messages:
            first, first_length = body.messages[0], len(added[0])
        tokens = kept.tokens + [token for rendered in added for token in rendered]
        ends = None if kept.ends is None else [*kept.ends, *_ends(added, len(kept.tokens))]
        starts = [*kept.starts, *(start + len(kept.seen) for start in body.starts)]
        state = TurnState(chain, [], items, body.end, first, tokens, first_length, starts, ends, kept.tags,
                          kept.item_bytes + input_bytes, kept.checked_at, kept.revision)
        return self._prompt_of(system, state, 0, []), state

    def _later(self, messages: list[ChatMessage]) -> list[list[int]]:
        try:
            return [self.rendering.render_message(message, False) for message in messages]
        except ValueError:  # a message the template cannot render on its own
            raise Whole from None

    def _head(self, message: ChatMessage) -> list[int]:
        """A first message's rendering: the same instructions and tools every turn, so kept."""
        head = self._heads.get(message)
        if head is None:
            try:
                head = self.rendering.render_message(message, True)
            except ValueError:
                raise Whole from None
            with self._heads_lock:
                if len(self._heads) >= 64:
                    self._heads.pop(next(iter(self._heads)))
                self._heads[message] = head
        return head

    def _tokens_of(self, prompt: list[int], system: ChatMessage | None,
                   body: list[ChatMessage]) -> tuple[list[int] | None, int, list[int] | None]:
        """From a whole prompt, the renderings of `body` as later messages, how many of their
        tokens are the first's, and where each message's end (when measured); None when the
        engine does not render message by message."""
        if self.rendering is None:
            return None, 0, None
        try:
            generation = self.rendering.generation_prompt()
            end = len(prompt) - len(generation)
            measured = self._later(body) if len(body) <= MEASURED_AT_ONCE else self._later(body[:1])
            later = measured[0] if body else []
            head = self._head(system if system is not None else body[0]) if system or body else []
        except Whole:
            return None, 0, None
        if prompt[end:] != generation or prompt[:len(head)] != head:
            return None, 0, None
        tokens = prompt[len(head):end] if system is not None else later + prompt[len(head):end]
        ends = _ends(measured, 0) if len(measured) == len(body) else None
        if ends is not None and (ends[-1] if ends else 0) != len(tokens):
            return None, 0, None
        return tokens, len(later), ends

    # -- fitting the window ------------------------------------------------------------------------

    def fits(self, params: CreateParams, length: int) -> bool:
        return length + self._needed(params) <= self.engine.context_window

    def _needed(self, params: CreateParams) -> int:
        return params.max_output_tokens or (compaction.SUMMARY_TOKENS if params.compact else 1)

    def fit(self, params: CreateParams, items: list[dict], whole: list[int],
            turn: TurnState | None) -> tuple[list[int], int, TurnState | None]:
        """The prompt, given the `whole` context's, and how many of the oldest items it leaves
        out. When the whole does not fit and truncation is `auto` (or this is a compaction run,
        which exists to shrink a context), keep the longest run of newest items that fits:
        found by doubling it from the newest item, then bisecting, so a long history costs a
        few measures of about the window's size, not one per dropped item. `turn` (the state
        the prompt leaves) lets it measure from kept lengths; it comes back measured."""
        if self.fits(params, len(whole)):
            return whole, 0, turn
        truncating = (params.truncation == "auto" or params.compact) and len(items) > 1
        if truncating and turn is not None and turn.tokens is not None:
            try:
                turn = self._measured(turn)
                system = system_message(params.instructions, params.functions, self.tool_format, params.effort)
                kept = _longest(len(items), lambda count: self.fits(
                    params, self._prompt_of(system, turn, len(items) - count, None)))
                if kept:
                    return self._prompt_of(system, turn, len(items) - kept, []), len(items) - kept, turn
                raise self._too_long(params, self._prompt_of(system, turn, len(items) - 1, None))
            except Whole:
                pass

        def newest(count: int) -> list[int]:
            return self.engine.render_prompt(self.messages(params, items[len(items) - count:]))

        if truncating:
            kept = _longest(len(items), lambda count: self.fits(params, len(newest(count))))
            if kept:
                return newest(kept), len(items) - kept, turn
            raise self._too_long(params, len(newest(1)))
        raise self._too_long(params, len(whole))

    def _too_long(self, params: CreateParams, length: int):
        return invalid(
            f"The input ({length} tokens) plus max_output_tokens ({self._needed(params)}) exceeds the model's "
            f"context window of {self.engine.context_window} tokens. Shorten the input, or set "
            "truncation to 'auto' to drop the oldest items.", "input", "context_length_exceeded")

    def _measured(self, turn: TurnState) -> TurnState:
        """The state with where each message's rendering ends, measured once for a long context
        rendered whole (then kept, and extended turn by turn)."""
        if turn.ends is not None:
            return turn
        ends = _ends(self._later(body_messages(turn.seen, self.tool_format, self.engine.reasoning_format).messages), 0)
        if (ends[-1] if ends else 0) != len(turn.tokens):
            raise Whole
        return dataclasses.replace(turn, ends=ends)

    def _prompt_of(self, system: ChatMessage | None, turn: TurnState, cut: int, into: list[int] | None):
        """The prompt of the state's items from `cut` on (its messages' renderings are
        `turn.tokens`): into a list when `into` is one, else only its length."""
        partial, rest = self._cut(turn, cut)
        offset = 0 if rest == 0 else turn.ends[rest - 1] if cut else 0
        first, later = system, partial
        if first is None and partial:
            first, later = partial[0], partial[1:]
        elif first is None and rest < len(turn.starts):
            first = turn.first if rest == 0 else self._message(turn, rest)
            offset = turn.first_length if rest == 0 else turn.ends[rest]
        head = self._head(first) if first is not None else []
        rendered = self._later(later)
        generation = self.rendering.generation_prompt()
        if into is None:
            return len(head) + sum(map(len, rendered)) + len(turn.tokens) - offset + len(generation)
        prompt = head + [token for tokens in rendered for token in tokens]
        prompt += turn.tokens[offset:] if offset else turn.tokens
        prompt += generation
        return prompt

    def _cut(self, turn: TurnState, cut: int) -> tuple[list[ChatMessage], int]:
        """The items from `cut` on as (messages of the items before the next message's start,
        index of that message): a cut at a message's start keeps the kept messages from there."""
        if cut == 0:
            return [], 0
        starts, seen = turn.starts, turn.seen
        index = bisect_right(starts, cut) - 1
        if index >= 0 and starts[index] == cut:
            return [], index
        rest = index + 1
        until = starts[rest] if rest < len(starts) else len(seen)
        partial = body_messages(seen[cut:until], self.tool_format, self.engine.reasoning_format)
        if not extends(partial.end, seen[until:until + 1]):
            raise Whole
        return partial.messages, rest

    def _message(self, turn: TurnState, index: int) -> ChatMessage:
        until = turn.starts[index + 1] if index + 1 < len(turn.starts) else len(turn.seen)
        return body_messages(turn.seen[turn.starts[index]:until], self.tool_format,
                             self.engine.reasoning_format).messages[0]


def _ends(rendered: list[list[int]], offset: int) -> list[int]:
    return list(itertools.accumulate(map(len, rendered), initial=offset))[1:]


def _longest(count: int, fits: Callable[[int], bool]) -> int:
    """The largest n in 1..count for which fits(n), found by doubling then bisecting (0: none)."""
    kept, size = 0, 1
    while size < count and fits(size):
        kept, size = size, size * 2
    too_many = min(size, count)
    while too_many - kept > 1:
        middle = (kept + too_many) // 2
        if fits(middle):
            kept = middle
        else:
            too_many = middle
    return kept
