"""Maintenance, run at start-up and then periodically: leases and retention.

A replica renews the lease of every response it is generating; a response whose lease ran out (its
replica crashed) is failed by whichever replica notices first, and its followers are woken.
Retention deletes finished responses older than the configured TTL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from parley.log import get_logger
from parley.service.stored_events import lease_recovery
from parley.store.base import ResponseStore
from parley.store.signals import EVENTS, LocalSignals

log = get_logger(__name__)


class Maintenance:
    def __init__(self, store: ResponseStore, signals: LocalSignals, *, replica_id: str, lease_seconds: float,
                 running: Callable[[], Collection[str]] = frozenset):
        self.store = store
        self.signals = signals
        self.replica_id = replica_id
        self.lease_seconds = lease_seconds
        self.running = running  # the stored responses this replica generates now

    async def run_once(self, response_ttl_seconds: int = 0) -> None:
        now = time.time()
        # Only what runs here: a response whose run ended without its final document stored (the
        # write failed) must expire and be failed, not stay in progress for as long as we live.
        await self.store.renew_leases(self.replica_id, now + self.lease_seconds, list(self.running()))
        for response_id in await self.store.recover_expired(now, lease_recovery):
            log.warning("response.lease_expired", response_id=response_id)
            await self.signals.publish(EVENTS, response_id)
        if response_ttl_seconds > 0:
            deleted = await self.store.delete_finished_before(now - response_ttl_seconds)
            if deleted:
                log.info("retention.deleted", responses=deleted, ttl_s=response_ttl_seconds)
