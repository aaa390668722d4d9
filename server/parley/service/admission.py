"""Admission control: a cap on running generations, a queue per project, and fair turns.

A generation slot that frees goes to the project whose turn it is: the one served least
recently among those with requests waiting, first come first served within a project. A
project that floods the queue therefore delays another's request by at most one slot's turn.
Each project may have `max_waiting` requests waiting (and `max_running` running); one more is
refused at once with 429 (`x-should-retry: true`), before any byte is sent, instead of waiting
without bound.
"""

from __future__ import annotations

import asyncio
import collections
import itertools

from parley.errors import ApiError, ErrorKind


class Ticket:
    def __init__(self, admission: "Admission", project: str):
        self._admission = admission
        self.project = project
        self._state = "waiting"
        self._turn: asyncio.Future | None = None

    async def start(self) -> None:
        """Wait for a slot (now, if one is free and nobody waits)."""
        admission = self._admission
        if self._state != "waiting":
            raise asyncio.CancelledError
        if admission.running < admission.max_running and not admission._queued:
            admission._take(self)
            return
        self._turn = asyncio.get_running_loop().create_future()
        admission._queue(self)
        try:
            await self._turn
        except BaseException:
            if self._state == "running":  # handed the slot as it was cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        """Idempotent: safe from every exit path."""
        admission = self._admission
        if self._state == "waiting":
            admission._leave(self)
        elif self._state == "running":
            admission._done(self)
        self._state = "released"


class Admission:
    def __init__(self, max_running: int, max_waiting: int):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0
        self._per_project: collections.Counter[str] = collections.Counter()  # waiting + running
        self._queues: dict[str, collections.deque[Ticket]] = {}
        self._queued = 0  # tickets in the queues (waiting for a slot, not just admitted)
        self._served_at: dict[str, int] = {}
        self._turns = itertools.count()

    def enter(self, project: str = "default") -> Ticket:
        if self._per_project[project] >= self.max_running + self.max_waiting:
            raise ApiError(ErrorKind.RATE_LIMITED,
                           f"The server is at capacity for this project ({self._per_project[project]} of its "
                           "generations running or queued). Please retry shortly.", None, "server_busy")
        self.waiting += 1
        self._per_project[project] += 1
        return Ticket(self, project)

    def _take(self, ticket: Ticket) -> None:
        ticket._state = "running"
        self.waiting -= 1
        self.running += 1
        self._served_at[ticket.project] = next(self._turns)

    def _queue(self, ticket: Ticket) -> None:
        self._queues.setdefault(ticket.project, collections.deque()).append(ticket)
        self._queued += 1

    def _leave(self, ticket: Ticket) -> None:
        self.waiting -= 1
        self._forget(ticket.project)
        queue = self._queues.get(ticket.project)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            self._queued -= 1
            if not queue:
                del self._queues[ticket.project]
        if ticket._turn is not None and not ticket._turn.done():
            ticket._turn.cancel()  # released while queued (shutdown, disconnect): start() ends

    def _done(self, ticket: Ticket) -> None:
        self.running -= 1
        self._forget(ticket.project)
        self._hand_on()

    def _forget(self, project: str) -> None:
        self._per_project[project] -= 1
        if not self._per_project[project]:
            del self._per_project[project]
            self._served_at.pop(project, None)

    def _hand_on(self) -> None:
        """Give free slots to the projects whose turn it is."""
        while self.running < self.max_running and self._queues:
            project = min(self._queues, key=lambda name: self._served_at.get(name, -1))
            queue = self._queues[project]
            ticket = queue.popleft()
            self._queued -= 1
            if not queue:
                del self._queues[project]
            self._take(ticket)
            ticket._turn.set_result(None)
