"""Background responses: generation tasks of this replica that outlive their request.

Clients follow a background response through the event log, so a dropped stream never stops
its generation, and any replica can serve its stream, a cancel or a GET. A cancel marks the
stored row and signals every replica; the one running it stops the engine and stores the
partial output. On shutdown, running work may finish within a grace period, then is failed.
"""

from __future__ import annotations

import asyncio
import contextlib

from parley.errors import ApiError, ErrorKind, invalid, not_found
from parley.log import get_logger
from parley.service.event_log import EventLog
from parley.service.events import json_copy
from parley.service.generation import Generation
from parley.service.preparation import PreparedResponse
from parley.store.base import ACTIVE, ResponseStore
from parley.store.signals import CANCEL, EVENTS, LocalSignals

log = get_logger(__name__)


async def _consume(batches) -> None:
    try:
        async for _ in batches:
            pass
    finally:
        await batches.aclose()


class BackgroundWork:
    def __init__(self, generation: Generation, store: ResponseStore, events: EventLog, signals: LocalSignals):
        self.generation = generation
        self.store = store
        self.events = events
        self.signals = signals
        self._tasks: dict[str, asyncio.Task] = {}

    async def start(self, prepared: PreparedResponse) -> dict:
        """Persist `response.created`/`queued`, start the generation task, return the queued document."""
        response_id = prepared.response["id"]
        snapshot = json_copy(prepared.stream.emit(prepared.builder.created())[0]["response"])
        await self.events.flush(response_id)
        task = asyncio.create_task(self._run(prepared), name=f"background:{response_id}")
        self._tasks[response_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(response_id, None))
        return snapshot

    async def _run(self, prepared: PreparedResponse) -> None:
        response_id = prepared.response["id"]
        with self.signals.watch(CANCEL, response_id) as cancelled:
            runner = asyncio.ensure_future(_consume(self.generation.run(prepared)))
            waiter = asyncio.ensure_future(cancelled.wait())
            try:
                await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not runner.done():
                    log.info("response.cancel_received", response_id=response_id)
            finally:
                waiter.cancel()
                if not runner.done():
                    runner.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await runner

    def stop(self, response_id: str) -> None:
        """Stop this replica's generation of `response_id`, if it runs one (the response is deleted)."""
        task = self._tasks.get(response_id)
        if task is not None:
            task.cancel()

    async def cancel(self, project: str, response_id: str) -> dict:
        await self.events.flush(response_id)
        document = await self.store.get(response_id, project)
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
            document, changed = await self.store.cancel(response_id, project)
            if not changed:  # it finished while we looked
                return await self.cancel(project, response_id) if document["status"] == "cancelled" else document
            await self.signals.publish(CANCEL, response_id)
            # Wait briefly for the runner (here or on another replica) to store the partial output.
            local = self._tasks.get(response_id)
            with contextlib.suppress(asyncio.TimeoutError):
                if local is not None:
                    await asyncio.wait_for(asyncio.shield(local), timeout=5)
                    await self.events.flush(response_id)
                else:
                    written.clear()
                    await asyncio.wait_for(written.wait(), timeout=5)
        log.info("response.cancelled", response_id=response_id, by="request")
        return await self.store.get(response_id) or document

    async def shutdown(self, grace: float) -> None:
        """Let running work finish within `grace`, then fail what is left."""
        running = list(self._tasks.values())
        if running:
            log.info("shutdown.draining", background=len(running), grace_s=grace)
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
