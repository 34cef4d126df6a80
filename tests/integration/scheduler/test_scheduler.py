"""The firing loop against a real Postgres and JetStream (RELIABILITY.md P4, T-U7)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

import asyncpg
import pytest

from nudge.db import Conn
from nudge.scheduler.v1 import scheduler_pb2
from services.scheduler import store
from services.scheduler.domain import TimerState

from .conftest import Rig

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


async def test_timer_fires_when_the_database_clock_reaches_due_at_and_not_before(
    rig: Rig,
) -> None:
    inbox = await rig.inbox()
    await rig.start_loop()
    due_at = await rig.now() + HOUR
    timer = await rig.schedule(due_at, payload=b"check-in")

    await inbox.assert_quiet()
    await rig.advance_clock(HOUR - timedelta(seconds=5))
    await inbox.assert_quiet()
    assert (await rig.timers.get(timer.timer_id)) == timer

    await rig.advance_clock(timedelta(seconds=6))
    [fired] = await inbox.wait_for(1, timeout_s=3)

    assert fired.msg_id == f"{timer.timer_id}:1"
    assert fired.timer_id == timer.timer_id
    assert fired.message.timer.payload == b"check-in"
    assert fired.message.timer.topic == "reminders"
    assert fired.message.timer.version == 1
    assert fired.message.timer.state == scheduler_pb2.TIMER_STATE_FIRED
    assert fired.message.snapshot_xmax > 0
    await rig.wait_until_states({"fired": 1})
    row = await rig.pool.fetchrow(
        "SELECT state, fired_at, due_at FROM timers WHERE timer_id = $1", timer.timer_id
    )
    assert row is not None
    assert row["state"] == "fired"
    assert row["fired_at"] >= row["due_at"]
    assert fired.message.fired_at.ToDatetime().timestamp() == pytest.approx(
        row["fired_at"].timestamp(), abs=1e-6
    )
    await inbox.assert_quiet()


async def test_loop_sleeps_until_the_next_due_time_instead_of_polling(rig: Rig) -> None:
    inbox = await rig.inbox()
    await rig.start_loop(max_idle_s=30.0)
    timer = await rig.schedule(await rig.now() + timedelta(seconds=0.8))

    await inbox.wait_for(1, timeout_s=3)
    await rig.wait_until_states({"fired": 1})

    row = await rig.pool.fetchrow(
        "SELECT fired_at - due_at AS lateness FROM timers WHERE timer_id = $1", timer.timer_id
    )
    assert row is not None
    assert timedelta(0) <= row["lateness"] < timedelta(seconds=0.5)


async def test_rearming_pushes_the_timer_out_so_only_the_later_check_fires(rig: Rig) -> None:
    inbox = await rig.inbox()
    await rig.start_loop()
    timer_id = uuid.uuid4()
    t0 = await rig.now()
    first = await rig.schedule(t0 + 14 * DAY, timer_id=timer_id, payload=b"session-1")
    await rig.advance_clock(DAY)
    t1 = await rig.now()
    rearmed = await rig.schedule(t1 + 14 * DAY, timer_id=timer_id, payload=b"session-2")
    assert (first.version, rearmed.version) == (1, 2)

    await rig.advance_clock(13 * DAY + timedelta(seconds=10))  # past t0+14d, before t1+14d
    await inbox.assert_quiet()
    assert await rig.states() == {"pending": 1}

    await rig.advance_clock(DAY)  # past t1+14d
    [fired] = await inbox.wait_for(1, timeout_s=3)
    assert fired.msg_id == f"{timer_id}:2"
    assert fired.message.timer.payload == b"session-2"
    assert fired.message.timer.due_at.ToDatetime().timestamp() == pytest.approx(
        (t1 + 14 * DAY).timestamp(), abs=1e-6
    )
    await inbox.assert_quiet()


async def test_cancelled_timer_never_fires(rig: Rig) -> None:
    inbox = await rig.inbox()
    await rig.start_loop()
    timer = await rig.schedule(await rig.now() + HOUR)

    assert await rig.timers.cancel(timer.timer_id) is TimerState.CANCELLED
    assert await rig.timers.cancel(timer.timer_id) is TimerState.CANCELLED
    assert await rig.timers.cancel(uuid.uuid4()) is None
    await rig.advance_clock(2 * HOUR)

    await inbox.assert_quiet()
    assert await rig.states() == {"cancelled": 1}


async def test_timers_fire_in_due_at_order_across_batches(rig: Rig) -> None:
    inbox = await rig.inbox()
    now = await rig.now()
    due_times = [now + timedelta(minutes=1, seconds=i) for i in range(30)]
    shuffled = list(enumerate(due_times))
    random.Random(7).shuffle(shuffled)
    ids = {}
    for index, due_at in shuffled:
        ids[(await rig.schedule(due_at, payload=str(index).encode())).timer_id] = index
    await rig.start_loop(batch_size=7)

    await rig.advance_clock(timedelta(minutes=2))
    received = await inbox.wait_for(30)

    assert [ids[fired.timer_id] for fired in received] == list(range(30))
    await inbox.assert_quiet()


async def test_scheduling_the_same_timer_twice_keeps_one_timer_and_one_version(
    rig: Rig,
) -> None:
    timer_id = uuid.uuid4()
    due_at = await rig.now() + HOUR

    first = await rig.schedule(due_at, timer_id=timer_id, payload=b"p")
    again = await rig.schedule(due_at, timer_id=timer_id, payload=b"p")
    changed = await rig.schedule(due_at, timer_id=timer_id, payload=b"q")

    assert first == again
    assert first.version == 1
    assert changed.version == 2
    assert await rig.pool.fetchval("SELECT count(*) FROM timers") == 1


async def test_rescheduling_a_fired_timer_arms_it_again_with_a_new_version(rig: Rig) -> None:
    inbox = await rig.inbox()
    await rig.start_loop()
    timer_id = uuid.uuid4()
    due_at = await rig.now() - timedelta(seconds=1)
    await rig.schedule(due_at, timer_id=timer_id)
    await inbox.wait_for(1)

    rearmed = await rig.schedule(due_at, timer_id=timer_id)

    assert rearmed.version == 2
    assert rearmed.state is TimerState.PENDING
    received = await inbox.wait_for(2)
    assert [fired.msg_id for fired in received] == [f"{timer_id}:1", f"{timer_id}:2"]


async def test_two_firing_loops_fire_each_of_200_due_timers_exactly_once(rig: Rig) -> None:
    inbox = await rig.inbox()
    now = await rig.now()
    for i in range(200):
        await rig.schedule(now + timedelta(minutes=1, milliseconds=i))
    loops = [await rig.start_loop(batch_size=10), await rig.start_loop(batch_size=10)]

    await rig.advance_clock(timedelta(minutes=2))
    received = await inbox.wait_for(200)
    await rig.wait_until_states({"fired": 200})
    await inbox.assert_quiet()

    assert len({fired.msg_id for fired in received}) == 200
    # JetStream would hide a double publish of one msg id, so count at the publishers too.
    assert sum(loop.fired for loop in loops) == 200
    assert sum(loop.duplicates for loop in loops) == 0


async def test_overdue_timers_fire_once_in_due_at_order_after_a_restart(rig: Rig) -> None:
    inbox = await rig.inbox()
    loop = await rig.start_loop(batch_size=25)
    now = await rig.now()
    ids = [(await rig.schedule(now + HOUR + timedelta(seconds=i))).timer_id for i in range(100)]
    await rig.stop_loop(loop)

    await rig.advance_clock(2 * HOUR)  # the outage: every timer is overdue, nobody fires
    await inbox.assert_quiet()
    restarted = await rig.start_loop(batch_size=25)
    received = await inbox.wait_for(100)
    await rig.wait_until_states({"fired": 100})
    await inbox.assert_quiet()

    assert [fired.timer_id for fired in received] == ids
    assert restarted.fired == 100


async def test_a_crash_between_publish_and_commit_refires_under_the_same_msg_ids(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = await rig.inbox()
    now = await rig.now()
    ids = [(await rig.schedule(now - timedelta(seconds=10 - i))).timer_id for i in range(5)]
    mark_fired = store.mark_fired
    crashes = 0

    async def crash_once(conn: Conn, timer_ids: Sequence[uuid.UUID], fired_at: datetime) -> int:
        nonlocal crashes
        if crashes == 0:
            crashes += 1
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection lost mid-commit")
        return await mark_fired(conn, timer_ids, fired_at)

    monkeypatch.setattr(store, "mark_fired", crash_once)
    loop = await rig.start_loop()

    await rig.wait_until_states({"fired": 5})
    received = await inbox.wait_for(5)
    await inbox.assert_quiet()

    assert crashes == 1
    assert [fired.timer_id for fired in received] == ids
    assert loop.fired == 5
    assert loop.duplicates == 5  # the re-publish was recognised by JetStream


async def test_a_timer_armed_during_a_long_sleep_wakes_the_loop(rig: Rig) -> None:
    inbox = await rig.inbox()
    await rig.schedule(await rig.now() + DAY)  # the loop will sleep max_idle_s
    await rig.start_loop(max_idle_s=60.0)
    await asyncio.sleep(0.2)

    soon = await rig.schedule(await rig.now() + timedelta(seconds=0.3))

    [fired] = await inbox.wait_for(1, timeout_s=3)
    assert fired.timer_id == soon.timer_id


async def test_pending_counts_are_exact_below_the_cap_and_capped_above(rig: Rig) -> None:
    now = await rig.now()
    for minutes in (-30, -20, -10, 10, 20):  # three overdue, two not yet due (no loop fires)
        await rig.schedule(now + timedelta(minutes=minutes))
    cancelled = await rig.schedule(now - HOUR)
    await rig.timers.cancel(cancelled.timer_id)

    assert await store.pending_counts(rig.pool) == (5, 3)
    assert await store.pending_counts(rig.pool, cap=5) == (5, 3)
    assert await store.pending_counts(rig.pool, cap=4) == (4, 3)  # the earliest due are counted
    assert await store.pending_counts(rig.pool, cap=2) == (2, 2)
