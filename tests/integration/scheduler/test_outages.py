"""The firing loop outlives Postgres and NATS outages (RELIABILITY.md P4, F3/F6 shapes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from nudge import bus, db
from nudge.dev.stack import NatsHandle, PostgresHandle, start_postgres
from nudge.migrate import apply_migrations
from services.scheduler.application import Timers

from .conftest import Rig


@pytest.fixture
async def own_postgres(pg_data_dir: Path) -> AsyncIterator[PostgresHandle]:
    """A Postgres of this test's own, so the test can kill it."""
    # Servers are started and stopped on the main thread (blocking the event loop briefly), so
    # the kernel stops them if this test process dies (PR_SET_PDEATHSIG, see nudge.dev.stack).
    handle = start_postgres(pg_data_dir, tcp_port=0)
    try:
        assert handle.tcp_dsn is not None
        await apply_migrations(handle.tcp_dsn)
        yield handle
    finally:
        handle.stop()


@pytest.fixture
async def rig_on_own_postgres(
    own_postgres: PostgresHandle, nats_client: NatsClient, test_id: str
) -> AsyncIterator[Rig]:
    assert own_postgres.tcp_dsn is not None
    names = bus.BusNames(f"t{test_id}")
    js = nats_client.jetstream()
    await bus.ensure_streams(js, names)
    pool = await db.create_pool(own_postgres.tcp_dsn, max_size=4, application_name="test")
    rig = Rig(own_postgres.tcp_dsn, pool, js, names, Timers(pool), [])
    try:
        yield rig
    finally:
        await rig.stop_all()
        await pool.close()


async def test_timers_fire_once_after_postgres_crashes_and_recovers(
    rig_on_own_postgres: Rig, own_postgres: PostgresHandle
) -> None:
    rig = rig_on_own_postgres
    inbox = await rig.inbox()
    now = await rig.now()
    ids = [(await rig.schedule(now + timedelta(seconds=2 + i * 0.01))).timer_id for i in range(20)]
    loop = await rig.start_loop(max_idle_s=1.0)

    own_postgres.kill()
    await asyncio.sleep(2.5)  # the timers come due while the database is down
    own_postgres.restart()

    received = await inbox.wait_for(20, timeout_s=30)
    await rig.wait_until_states({"fired": 20})
    await inbox.assert_quiet()
    assert [fired.timer_id for fired in received] == ids
    assert loop.fired == 20
    await asyncio.wait_for(loop.listening.wait(), timeout=10)  # the LISTEN was re-established


async def test_timers_fire_once_after_nats_restarts(rig: Rig, nats_server: NatsHandle) -> None:
    inbox = await rig.inbox()
    now = await rig.now()
    ids = [(await rig.schedule(now + HOUR_AND(i))).timer_id for i in range(10)]
    loop = await rig.start_loop(max_idle_s=1.0, publish_timeout_s=0.5)

    nats_server.stop()
    await rig.advance_clock(timedelta(hours=2))  # due while NATS is down: publishing fails
    await asyncio.sleep(1.5)
    assert await rig.states() == {"pending": 10}
    nats_server.restart()

    received = await inbox.wait_for(10, timeout_s=30)
    await rig.wait_until_states({"fired": 10})
    await inbox.assert_quiet()
    assert sorted(fired.timer_id for fired in received) == sorted(ids)
    assert len({fired.msg_id for fired in received}) == 10
    assert loop.fired == 10


def HOUR_AND(seconds: int) -> timedelta:
    return timedelta(hours=1, seconds=seconds)
