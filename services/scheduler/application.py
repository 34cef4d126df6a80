"""Scheduler use cases: arming timers, and the firing loop that publishes the due ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence

import asyncpg
import nats.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck

from nudge import db, metrics, telemetry
from nudge.bus import BusNames, trace_headers
from nudge.logs import WORKSPACE_ATTRIBUTE
from nudge.runtime import sleep_or_wake
from services.scheduler import store
from services.scheduler.domain import Timer, TimerRequest, TimerState, seconds_to_sleep
from services.scheduler.messages import timer_fired
from services.scheduler.store import FiringSnapshot

log = logging.getLogger("nudge.scheduler")

RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    # What asyncpg raises on a pooled connection whose server died mid-transaction
    # (MagicStack/asyncpg#784), instead of ConnectionDoesNotExistError.
    asyncpg.exceptions.InternalClientError,
    nats.errors.Error,
)
"""Database and NATS failures the firing loop outlives by retrying with backoff."""

_MIN_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 5.0


class Timers:
    """Arm, cancel and inspect timers (the use cases behind the gRPC API)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def schedule(self, request: TimerRequest) -> Timer:
        """Arm or re-arm a timer; return it as stored."""
        async with self._pool.acquire() as conn:
            return await store.schedule(conn, request)

    async def cancel(self, timer_id: uuid.UUID) -> TimerState | None:
        """Cancel a pending timer; return its state afterwards (None when unknown)."""
        async with self._pool.acquire() as conn:
            return await store.cancel(conn, timer_id)

    async def get(self, timer_id: uuid.UUID) -> Timer | None:
        """The stored timer, or None."""
        return await store.get(self._pool, timer_id)


class FiringLoop:
    """Publishes due timers as TimerFired, in due_at order, never early, never twice.

    Several loops (in several replicas) may run against one database: each claims its own
    batch with SKIP LOCKED. The loop sleeps until the next due time (at most `max_idle_s`) or
    until a NOTIFY on `nudge_timers` (a timer was armed) or `nudge_clock` (the dev clock moved).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        names: BusNames,
        *,
        listen_dsn: str,
        batch_size: int = 100,
        max_idle_s: float = 1.0,
        publish_timeout_s: float = 5.0,
    ) -> None:
        self._pool = pool
        self._js = js
        self._names = names
        self._listen_dsn = listen_dsn
        self._batch_size = batch_size
        self._max_idle_s = max_idle_s
        self._publish_timeout_s = publish_timeout_s
        self._wake = asyncio.Event()
        self.listening = asyncio.Event()
        self.fired = 0
        self.duplicates = 0

    async def run(self) -> None:
        """Fire due timers until cancelled, retrying through database and NATS outages."""
        backoff_s = _MIN_BACKOFF_S
        listener: asyncpg.Connection | None = None
        try:
            while True:
                try:
                    if listener is None or listener.is_closed():
                        if listener is not None:
                            await _close_quietly(listener)
                            listener = None
                        listener = await self._listen()
                    await self._fire_then_sleep()
                    backoff_s = _MIN_BACKOFF_S
                except RETRYABLE_ERRORS as error:
                    log.warning("firing timers failed (%r); retrying in %.1fs", error, backoff_s)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
        finally:
            self.listening.clear()
            if listener is not None:
                await _close_quietly(listener)

    async def _listen(self) -> asyncpg.Connection:
        conn = await db.connect(self._listen_dsn, application_name="nudge-scheduler-listen")
        try:
            for channel in (store.TIMERS_CHANNEL, store.CLOCK_CHANNEL):
                await conn.add_listener(channel, self._on_notify)
            conn.add_termination_listener(self._on_listener_lost)
        except BaseException:
            await _close_quietly(conn)
            raise
        self.listening.set()
        return conn

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._wake.set()

    def _on_listener_lost(self, conn: object) -> None:
        self.listening.clear()
        self._wake.set()

    async def _fire_then_sleep(self) -> None:
        fired = await self.fire_once()
        if fired == self._batch_size:
            return  # a full batch: more may be due already (overdue timers after an outage)
        next_due_in = await store.next_due_in(self._pool)
        await sleep_or_wake(
            self._wake, seconds_to_sleep(next_due_in, self._max_idle_s, fired=fired)
        )

    async def fire_once(self) -> int:
        """Fire one batch of due timers; return how many fired."""
        async with self._pool.acquire() as conn, conn.transaction():
            due = await store.claim_due(conn, self._batch_size)
            if not due:
                return 0
            snapshot = await store.firing_snapshot(conn)
            # Publish and await every PubAck first, then mark fired and commit. A crash in
            # between leaves the timers pending (Postgres rolls back the dead transaction and
            # releases its row locks); the next claim, here or in another replica, publishes
            # them again under the same Nats-Msg-Id `<timer_id>:<version>`, which JetStream
            # drops as a duplicate within its 10-minute window, and beyond that window the
            # consumer's inbox row makes the repeat a no-op. Marking fired before publishing
            # would instead lose the timer on a crash.
            await self._publish(due, snapshot)
            await store.mark_fired(conn, [timer.timer_id for timer in due], snapshot.fired_at)
        self.fired += len(due)
        metrics.TIMERS_FIRED.inc(len(due))
        for timer in due:
            metrics.TIMER_LATENESS.observe((snapshot.fired_at - timer.due_at).total_seconds())
        return len(due)

    async def _publish(self, timers: Sequence[Timer], snapshot: FiringSnapshot) -> None:
        acks: list[asyncio.Future[PubAck]] = []
        try:
            # publish_async writes each message before returning, so the stream receives them
            # in due_at order; the acknowledgements are awaited together.
            for timer in timers:
                ack = await self._js.publish_async(
                    self._names.timers_subject(timer.topic),
                    timer_fired(timer, snapshot).SerializeToString(),
                    stream=self._names.timers_stream,
                    headers=self._headers(timer),
                )
                acks.append(ack)
            async with asyncio.timeout(self._publish_timeout_s):
                results = await asyncio.gather(*acks)
        finally:
            _discard_unfinished(acks)
        self.duplicates += sum(1 for result in results if result.duplicate)

    def _headers(self, timer: Timer) -> dict[str, str]:
        # A fired timer starts a new trace linked to the one that armed it: one trace spanning
        # days would be dropped or split by tail samplers (ECOSYSTEM.md §4.2).
        with telemetry.producer_span(
            self._names.timers_subject(timer.topic),
            timer.msg_id,
            causes=[telemetry.span_context_of(timer.traceparent)],
            new_trace=True,
            attributes={
                "nudge.timer_id": str(timer.timer_id),
                "nudge.topic": timer.topic,
                WORKSPACE_ATTRIBUTE: timer.workspace_id,
            },
        ):
            return trace_headers(timer.msg_id)


def _discard_unfinished(acks: Sequence[asyncio.Future[PubAck]]) -> None:
    for ack in acks:
        if not ack.done():
            ack.cancel()  # frees the NATS client's slot for an acknowledgement that never came
        elif not ack.cancelled():
            ack.exception()  # retrieved: a failed batch is reported once, by the caller


async def _close_quietly(conn: asyncpg.Connection) -> None:
    with contextlib.suppress(Exception):
        await conn.close(timeout=1.0)
