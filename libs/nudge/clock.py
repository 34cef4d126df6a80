"""A process-local view of the database clock, for checks that need no round trip.

Timing decisions (due times, leases, windows) are made in SQL with `nudge_now()`. Validation
(is this client timestamp absurd?) only needs the database time within a second, so the offset
between local time and `nudge_now()` is sampled periodically instead of queried per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

import asyncpg

log = logging.getLogger("nudge.clock")


class DbClock:
    """Local time plus the last measured offset to the database clock."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._offset = timedelta(0)

    def now(self) -> datetime:
        """The database time, estimated locally."""
        return datetime.now(UTC) + self._offset

    async def __call__(self) -> datetime:
        return self.now()

    async def sync(self) -> timedelta:
        """Measure the offset to `nudge_now()` (including any dev clock skew)."""
        before = time.time()
        db_time = await self._pool.fetchval("SELECT nudge_now()")
        after = time.time()
        local_mid = datetime.fromtimestamp((before + after) / 2, UTC)
        self._offset = db_time - local_mid
        return self._offset

    async def run(self, interval_s: float = 1.0) -> None:
        """Re-measure every `interval_s` forever."""
        while True:
            try:
                await self.sync()
            except (OSError, asyncpg.PostgresError) as error:
                log.warning("clock sync failed: %r", error)
            await asyncio.sleep(interval_s)
