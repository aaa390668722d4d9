"""Wake-ups between replicas: "new events for response X" and "cancel response X".

Signals carry only a response id; the store stays the source of truth, so a lost signal costs
latency (followers also poll), never correctness. One process fans signals out to local
waiters; with PostgreSQL, LISTEN/NOTIFY carries them between replicas.
"""

from __future__ import annotations

import asyncio
import contextlib

from parley.log import get_logger

log = get_logger(__name__)

EVENTS = "parley_events"
CANCEL = "parley_cancel"


class LocalSignals:
    """In-process fan-out; all a single SQLite node needs."""

    def __init__(self) -> None:
        self._waiters: dict[tuple[str, str], set[asyncio.Event]] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def publish(self, channel: str, response_id: str) -> None:
        self.deliver(channel, response_id)

    def deliver(self, channel: str, response_id: str) -> None:
        for waiter in self._waiters.get((channel, response_id), ()):
            waiter.set()

    def watched(self, channel: str, response_id: str) -> bool:
        """Whether anyone in this process waits for `channel` of `response_id` now."""
        return (channel, response_id) in self._waiters

    @contextlib.contextmanager
    def watch(self, channel: str, response_id: str):
        """An asyncio.Event set whenever `channel` fires for `response_id` while watched."""
        event = asyncio.Event()
        key = (channel, response_id)
        self._waiters.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[key]


class PostgresSignals(LocalSignals):
    """LISTEN/NOTIFY on a dedicated connection, reconnecting with backoff when it drops."""

    def __init__(self, dsn: str):
        super().__init__()
        self.dsn = dsn
        self._listener: asyncio.Task | None = None
        self._sender = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        import psycopg

        self._sender = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        self._listener = asyncio.create_task(self._listen(), name="pg-listen")
        await asyncio.wait_for(self._ready.wait(), timeout=30)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._sender is not None:
            await self._sender.close()

    async def publish(self, channel: str, response_id: str) -> None:
        self.deliver(channel, response_id)  # local waiters need no round trip
        try:
            await self._sender.execute("SELECT pg_notify(%s, %s)", (channel, response_id))
        except Exception as error:  # followers poll too, so a lost signal only adds latency
            log.warning("signals.publish_failed", channel=channel, error=str(error))

    async def _listen(self) -> None:
        import psycopg

        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {EVENTS}")
                    await conn.execute(f"LISTEN {CANCEL}")
                    self._ready.set()
                    delay = 0.5
                    async for notify in conn.notifies():
                        self.deliver(notify.channel, notify.payload)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("signals.listen_failed", error=str(error), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
