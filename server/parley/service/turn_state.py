"""Where a chain's next turn starts: kept in memory, so that turn 1,000 costs what turn 2 does.

A `previous_response_id` turn needs its chain's whole context three times over: the items (one
store query), the chat messages they make, and the prompt's tokens; each grows with the chain. The
replica that ran a stored response keeps, for a while, what its continuation starts from (a
TurnState): the chain's items as the store would give them, the items as the model saw them
(compaction items opened, superseded turns left out), where the messages end, and, where the
engine renders message by message (engine/segments.py), the tokens of those messages. The
continuation then makes messages and tokens of its new items only (service/preparation.py).

A kept state is trusted only after one store lookup (ResponseStore.chain_intact): the previous
response still exists in the project, and no response of its chain was deleted, on any replica
(a deletion leaves its chain's tombstone in the same transaction). States last at most MAX_AGE
after that lookup, far less than tombstones last. One state per chain's latest response: a
continuation's state replaces its predecessor's, so a fork from an older turn reads its chain
from the store once. Memory is bounded by an estimate of what states hold (their lists, and the
bytes of the items they alone keep alive are counted in full for every state that holds them:
an overestimate). Whatever a state cannot express takes the whole path, whose result is the same.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from parley.engine.base import ChatMessage
from parley.ids import chain_tag
from parley.store.base import JOINING_STATUSES, TOMBSTONE_SECONDS

MAX_AGE = TOMBSTONE_SECONDS / 24
# The statuses a continuation may start from: those whose items join their conversation.
CONTINUABLE = frozenset(JOINING_STATUSES)
SLOT_BYTES = 8  # a list's pointer to an item or token


@dataclasses.dataclass(frozen=True, slots=True)
class TurnState:
    chain: list[dict]           # the chain's items, as ResponseStore.chain_context gives them
    pending: list[dict]         # ... and after them the output that made this state's response
    seen: list[dict]            # `chain` as the model saw it (opened, superseded)
    end: str | None             # where their messages end (conversation.body_messages)
    first: ChatMessage | None   # the first of those messages (a template renders it otherwise)
    tokens: list[int] | None    # every message rendered as a later one; None: rendered whole
    first_length: int           # how many of `tokens` are the first message's
    starts: list[int]           # the item of `seen` at which each message's items start
    ends: list[int] | None      # where each message's rendering ends in `tokens` (None: not measured)
    tags: frozenset[str]        # the chain's tags (ids.chain_tag)
    item_bytes: int             # the JSON size of `chain`
    checked_at: float           # when the store last vouched for the chain
    revision: int | None = None  # a conversation's: the revision (store.base) the state is of

    def finished(self, response_id: str, output: list[dict], item_bytes: int) -> TurnState:
        """The state a continuation of this response starts from: its output is pending, to be
        turned into messages with that continuation's input. A conversation's next revision is
        the one this response's items joining it make."""
        return dataclasses.replace(self, pending=output, tags=self.tags | {chain_tag(response_id)},
                                   item_bytes=self.item_bytes + item_bytes,
                                   revision=None if self.revision is None else self.revision + 1)

    @property
    def history(self) -> list[dict]:
        """The context a continuation starts from, as the store would give it."""
        return [*self.chain, *self.pending]

    @property
    def size(self) -> int:
        return self.item_bytes + SLOT_BYTES * (len(self.chain) + len(self.seen) + len(self.tokens or ())
                                               + len(self.starts) + len(self.ends or ()))


class TurnStates:
    """The kept states of one replica, by (project, response id); least recently used go first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._states: collections.OrderedDict[tuple[str, str], TurnState] = collections.OrderedDict()
        self._bytes = 0

    def get(self, project: str, response_id: str) -> TurnState | None:
        key = (project, response_id)
        state = self._states.get(key)
        if state is not None and time.time() - state.checked_at > MAX_AGE:
            self.discard(project, response_id)
            state = None
        return state

    def put(self, project: str, response_id: str, state: TurnState, replaces: str | None) -> None:
        if replaces is not None:
            self.discard(project, replaces)
        if state.size > self.max_bytes:
            return
        self.discard(project, response_id)
        self._states[(project, response_id)] = state
        self._bytes += state.size
        while self._bytes > self.max_bytes:
            _, evicted = self._states.popitem(last=False)
            self._bytes -= evicted.size

    def discard(self, project: str, response_id: str) -> None:
        state = self._states.pop((project, response_id), None)
        if state is not None:
            self._bytes -= state.size

    def __len__(self) -> int:
        return len(self._states)
