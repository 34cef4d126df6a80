"""Ingest application: validate, rate-limit and group-commit events into the store."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import asyncpg
from opentelemetry import trace
from opentelemetry.trace import SpanContext

from nudge import eventstore, metrics, telemetry
from nudge.eventstore import NewEvent
from services.ingest.domain import TokenBucket

log = logging.getLogger("nudge.ingest")


class Outcome(Enum):
    """What happened to one event."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass
class _Pending:
    events: Sequence[NewEvent]
    done: asyncio.Future[list[Outcome]]
    caller: SpanContext


class GroupCommitter:
    """Appends events from many concurrent requests in shared transactions.

    Requests queue up while up to `max_concurrent_commits` transactions are in flight; each
    transaction takes everything queued (up to `max_batch_events`). Under load that makes one
    INSERT + one commit serve many requests; idle, a request commits alone at once.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch_events: int = 5000,
        max_concurrent_commits: int = 3,
        on_commit: asyncio.Event | None = None,
    ) -> None:
        self._pool = pool
        self._max_batch_events = max_batch_events
        self._slots = asyncio.Semaphore(max_concurrent_commits)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._on_commit = on_commit
        self._tasks: set[asyncio.Task[None]] = set()
        self.batch_sizes: list[int] = []

    async def append(self, events: Sequence[NewEvent]) -> list[Outcome]:
        """Append `events`; return one outcome per event once committed."""
        if not events:
            return []
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        caller = trace.get_current_span().get_span_context()
        self._queue.put_nowait(_Pending(events, future, caller))
        return await future

    async def run(self) -> None:
        """The flush loop; run it as a background task for the life of the service."""
        try:
            while True:
                first = await self._queue.get()
                await self._slots.acquire()
                batch = [first]
                size = len(first.events)
                while size < self._max_batch_events and not self._queue.empty():
                    item = self._queue.get_nowait()
                    batch.append(item)
                    size += len(item.events)
                task = asyncio.create_task(self._flush(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in self._tasks:
                task.cancel()

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            with telemetry.batch_span(
                "append events",
                (p.caller for p in batch),
                attributes={"nudge.requests": len(batch)},
            ):
                results = await self._commit_with_retry([p.events for p in batch])
        except BaseException as error:
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(error)
            if not isinstance(error, Exception):
                raise
        else:
            for pending, outcome in zip(batch, results, strict=True):
                if not pending.done.done():
                    pending.done.set_result(outcome)
            if self._on_commit is not None:
                self._on_commit.set()
        finally:
            self._slots.release()

    async def _commit_with_retry(self, requests: list[Sequence[NewEvent]]) -> list[list[Outcome]]:
        for attempt in range(5):
            try:
                return await self._commit(requests)
            except (
                asyncpg.exceptions.DeadlockDetectedError,
                asyncpg.exceptions.SerializationError,
            ):
                # Two batches racing on the same event ids; the retry sees them as existing.
                await asyncio.sleep(0.005 * (attempt + 1))
        return await self._commit(requests)

    async def _commit(self, requests: list[Sequence[NewEvent]]) -> list[list[Outcome]]:
        flat = [e for events in requests for e in events]
        # Sorted so concurrent batches take unique-index locks in the same order (no deadlock).
        ordered = sorted(flat, key=lambda e: (e.workspace_id, e.event_id))
        self.batch_sizes.append(len(flat))
        if len(self.batch_sizes) > 10_000:
            del self.batch_sizes[:5_000]
        metrics.APPEND_BATCH_EVENTS.observe(len(flat))
        with metrics.APPEND_SECONDS.time():
            async with self._pool.acquire() as conn, conn.transaction():
                inserted = await eventstore.append(conn, ordered)
                not_inserted = {(e.workspace_id, e.event_id) for e in flat} - inserted
                stored = await eventstore.existing_hashes(conn, not_inserted)
        kept_hash: dict[tuple[str, str], bytes] = {}
        for event in ordered:
            kept_hash.setdefault((event.workspace_id, event.event_id), event.body_hash())
        claimed: set[tuple[str, str]] = set()
        results: list[list[Outcome]] = []
        for events in requests:
            outcomes: list[Outcome] = []
            for event in events:
                key = (event.workspace_id, event.event_id)
                if key in inserted and key not in claimed:
                    claimed.add(key)
                    outcomes.append(Outcome.ACCEPTED)
                elif stored.get(key, kept_hash[key]) == event.body_hash():
                    outcomes.append(Outcome.DUPLICATE)
                else:
                    outcomes.append(Outcome.CONFLICT)
            results.append(outcomes)
        return results


class RateLimiter:
    """Per-workspace token buckets over events per second."""

    def __init__(self, events_per_s: float, burst: float) -> None:
        self._rate = events_per_s
        self._burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, workspace_id: str, events: int) -> float | None:
        """None when admitted; otherwise the seconds to wait before retrying."""
        bucket = self._buckets.get(workspace_id)
        if bucket is None:
            bucket = self._buckets[workspace_id] = TokenBucket(self._rate, self._burst)
            bucket.updated = time.monotonic()
        if bucket.take(events, time.monotonic()):
            return None
        return bucket.wait_s(events)
