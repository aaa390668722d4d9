"""A ResponsesService on a fresh SQLite file, for pipeline tests with the scripted engine."""

from __future__ import annotations

import contextlib
from pathlib import Path

from parley.service.responses import ResponsesService
from parley.store.sqlite import SqliteStore


@contextlib.asynccontextmanager
async def service_on(path: Path, engine, **options):
    store = SqliteStore(path)
    await store.open()
    service = ResponsesService(engine, store, **options)
    try:
        yield service
    finally:
        await service.drain()
        await store.close()


async def stream(service: ResponsesService, **body) -> list[dict]:
    """All events of one streamed create, after its writes have landed."""
    prepared = await service.prepare("default", {"model": service.engine.model_id, "stream": True, **body})
    events = [event async for batch in service.run(prepared) for event in batch]
    await service.drain()
    return events
