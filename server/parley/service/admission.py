"""Admission control: a cap on running generations and on those waiting for a slot.

A request that finds both full is refused at once with 429 (`x-should-retry: true`), before
any byte is sent, instead of waiting without bound.
"""

from __future__ import annotations

import asyncio

from parley.errors import ApiError, ErrorKind


class Ticket:
    def __init__(self, admission: "Admission"):
        self._admission = admission
        self._state = "waiting"

    async def start(self) -> None:
        await self._admission._slots.acquire()
        if self._state != "waiting":  # released while waiting (shutdown, disconnect)
            self._admission._slots.release()
            raise asyncio.CancelledError
        self._state = "running"
        self._admission.waiting -= 1
        self._admission.running += 1

    def release(self) -> None:
        """Idempotent: safe from every exit path."""
        if self._state == "waiting":
            self._admission.waiting -= 1
        elif self._state == "running":
            self._admission.running -= 1
            self._admission._slots.release()
        self._state = "released"


class Admission:
    def __init__(self, max_running: int, max_waiting: int):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_running)

    def enter(self) -> Ticket:
        if self.running + self.waiting >= self.max_running + self.max_waiting:
            raise ApiError(ErrorKind.RATE_LIMITED,
                           f"The server is at capacity ({self.running} generations running, {self.waiting} "
                           "queued). Please retry shortly.", None, "server_busy")
        self.waiting += 1
        return Ticket(self)
