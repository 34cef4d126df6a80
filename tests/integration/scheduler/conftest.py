"""Scheduler test rig: a real database and JetStream, firing loops run as tasks in-process."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from nudge import bus, db
from nudge.scheduler.v1 import scheduler_pb2
from services.scheduler.application import FiringLoop, Timers
from services.scheduler.domain import Timer, TimerRequest

TOPIC = "reminders"


@dataclass(frozen=True)
class Fired:
    """One TimerFired message as received from JetStream."""

    msg_id: str
    message: scheduler_pb2.TimerFired

    @property
    def timer_id(self) -> uuid.UUID:
        return uuid.UUID(self.message.timer.timer_id)


class FiredInbox:
    """Consumes (and acks) every TimerFired message of one topic."""

    def __init__(self, js: JetStreamContext, names: bus.BusNames, topic: str) -> None:
        self._js = js
        self._names = names
        self._topic = topic
        self.received: list[Fired] = []
        self._subscription: JetStreamContext.PullSubscription | None = None

    async def open(self) -> None:
        subject = self._names.timers_subject(self._topic)
        self._subscription = await self._js.pull_subscribe(
            subject,
            durable=f"test-{self._topic}",
            stream=self._names.timers_stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10_000),
        )

    async def _pull(self, timeout_s: float) -> int:
        assert self._subscription is not None
        try:
            messages = await self._subscription.fetch(500, timeout=timeout_s)
        except TimeoutError:
            return 0
        for message in messages:
            assert message.headers is not None
            self.received.append(
                Fired(
                    message.headers["Nats-Msg-Id"],
                    scheduler_pb2.TimerFired.FromString(message.data),
                )
            )
            await message.ack_sync()
        return len(messages)

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Fired]:
        """Everything received once at least `count` messages arrived (fails on timeout)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(self.received) < count:
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, f"received {len(self.received)} of {count} fired timers"
            await self._pull(min(left, 0.5))
        return list(self.received)

    async def assert_quiet(self, wait_s: float = 0.5) -> None:
        """Nothing more arrives within `wait_s`."""
        before = len(self.received)
        await self._pull(wait_s)
        assert self.received[before:] == []


@dataclass
class Rig:
    """A migrated database, a unique bus prefix, and helpers to drive the scheduler."""

    database_url: str
    pool: asyncpg.Pool
    js: JetStreamContext
    names: bus.BusNames
    timers: Timers
    _loops: list[tuple[FiringLoop, asyncio.Task[None], asyncpg.Pool]]

    async def start_loop(
        self, *, batch_size: int = 100, max_idle_s: float = 30.0, publish_timeout_s: float = 5.0
    ) -> FiringLoop:
        """Start a firing loop (with its own pool, like a replica); wait until it listens.

        `max_idle_s` defaults high so tests prove the precise wake-ups, not the polling.
        """
        pool = await db.create_pool(self.database_url, max_size=4, application_name="test-loop")
        loop = FiringLoop(
            pool,
            self.js,
            self.names,
            listen_dsn=self.database_url,
            batch_size=batch_size,
            max_idle_s=max_idle_s,
            publish_timeout_s=publish_timeout_s,
        )
        task = asyncio.create_task(loop.run(), name="firing-loop")
        self._loops.append((loop, task, pool))
        await asyncio.wait_for(loop.listening.wait(), timeout=10)
        return loop

    async def stop_loop(self, loop: FiringLoop) -> None:
        """Stop one loop (as a crash or shutdown would: mid-sleep or mid-batch)."""
        for entry in list(self._loops):
            if entry[0] is loop:
                self._loops.remove(entry)
                await _stop(entry)

    async def stop_all(self) -> None:
        while self._loops:
            await _stop(self._loops.pop())

    async def now(self) -> datetime:
        """The database clock."""
        return await db.db_now(self.pool)

    async def advance_clock(self, by: timedelta) -> None:
        """Skip the database clock forward and tell the firing loops, as the dev clock tool does."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE dev_clock SET skew = skew + $1::interval", by)
            await conn.execute("NOTIFY nudge_clock")

    async def schedule(
        self,
        due_at: datetime,
        *,
        timer_id: uuid.UUID | None = None,
        payload: bytes = b"",
        topic: str = TOPIC,
    ) -> Timer:
        return await self.timers.schedule(
            TimerRequest(
                timer_id=timer_id or uuid.uuid4(),
                workspace_id="acme",
                topic=topic,
                due_at=due_at,
                payload=payload,
                traceparent="",
            )
        )

    async def inbox(self, topic: str = TOPIC) -> FiredInbox:
        inbox = FiredInbox(self.js, self.names, topic)
        await inbox.open()
        return inbox

    async def wait_until_states(self, expected: dict[str, int]) -> None:
        """Wait for the timer table to reach `expected` (messages arrive before the commit)."""

        async def reached() -> bool:
            return await self.states() == expected

        await eventually(reached)

    async def states(self) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT state, count(*) AS n FROM timers GROUP BY state")
        return {row["state"]: row["n"] for row in rows}


async def _stop(entry: tuple[FiringLoop, asyncio.Task[None], asyncpg.Pool]) -> None:
    _, task, pool = entry
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done, "the firing loop ignored its cancellation"
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await pool.close()


@pytest.fixture
async def nats_client(nats_url: str) -> AsyncIterator[NatsClient]:
    nc = await bus.connect(nats_url, "scheduler-test")
    yield nc
    await nc.close()


@pytest.fixture
async def rig(database_url: str, nats_client: NatsClient, test_id: str) -> AsyncIterator[Rig]:
    names = bus.BusNames(f"t{test_id}")
    js = nats_client.jetstream()
    await bus.ensure_streams(js, names)
    pool = await db.create_pool(database_url, max_size=8, application_name="test")
    rig = Rig(database_url, pool, js, names, Timers(pool), [])
    try:
        yield rig
    finally:
        await rig.stop_all()
        await pool.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Wait until `check()` is true."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)
