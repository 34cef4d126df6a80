"""Timers of the rules engine against real Postgres: inactivity re-arms (T-U7), the fire-time
re-check waits for the projection watermark (T-U9), exceptions cancel at once, resuming a
paused campaign re-arms what came due. The projector and the timer handler run in-process; a
fired timer is built the way the scheduler builds it (its fire time and snapshot xmax)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from nudge import db, eventstore
from nudge.bus import BusNames
from services.rules import store
from services.rules.application import CampaignCache, Planner, Projector
from tests.integration.rules.conftest import MARGIN, Engine, example


async def test_every_session_re_arms_one_inactivity_timer(engine: Engine) -> None:  # T-U7
    await engine.admin.apply(engine.workspace_id, example("win-back.yaml"))
    await engine.append(
        engine.event("u1", "$identify", "id-1", email="u1@example.test"),
        engine.event("u1", "session_start", "s1"),
    )
    await engine.project()
    [armed] = await engine.instances()
    later = armed["due_at"] - timedelta(days=14) + timedelta(days=3)
    await engine.advance_to(later)
    await engine.append(engine.event("u1", "session_start", "s2"))
    await engine.project()

    [rearmed] = await engine.instances()
    assert (rearmed["id"], rearmed["state"], rearmed["trigger_event_id"]) == (
        armed["id"],
        "pending",
        "s2",
    )
    assert rearmed["due_at"] - armed["due_at"] >= timedelta(days=3)
    timers = await engine.outbox()
    assert [kind for kind, _ in timers] == ["schedule", "schedule"]
    assert {timer_id for _, (timer_id, _) in timers} == {armed["id"]}
    assert timers[-1][1][1] == (rearmed["due_at"] + MARGIN).replace(tzinfo=None)
    assert await engine.kinds("u1") == ["triggered", "rearmed"]

    # The timer armed for the first due time fires (it raced the re-arm): still active.
    await engine.advance_to(armed["due_at"] + MARGIN)
    await engine.timers.handle(await engine.fire(armed["id"]))
    assert await engine.kinds("u1") == ["triggered", "rearmed", "still_active"]
    assert [i["state"] for i in await engine.instances()] == ["pending"]


async def test_the_fire_time_recheck_waits_for_a_session_still_being_committed(
    engine: Engine,
) -> None:  # T-U9
    await engine.admin.apply(engine.workspace_id, example("win-back.yaml"))
    await engine.append(
        engine.event("u1", "$identify", "id-1", email="u1@example.test"),
        engine.event("u1", "session_start", "s1"),
    )
    await engine.project()
    [armed] = await engine.instances()

    # A session stamped just before the due time, in a transaction still open when the timer
    # fires (after due + margin).
    await engine.advance_to(armed["due_at"] - timedelta(seconds=1))
    slow = await db.connect(engine.database_url)
    try:
        transaction = slow.transaction()
        await transaction.start()
        await eventstore.append(slow, [engine.event("u1", "session_start", "late")])
        await engine.advance_to(armed["due_at"] + MARGIN + timedelta(seconds=1))
        fired = await engine.fire(armed["id"])
        await engine.project()  # the open transaction holds the projection back
        waiting = asyncio.create_task(engine.timers.wait_for_projection(fired.snapshot_xmax))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await transaction.commit()
    finally:
        await slow.close()
    await engine.project()
    assert await asyncio.wait_for(waiting, 5)

    await engine.timers.handle(fired)
    assert await engine.kinds("u1") == ["triggered", "rearmed", "still_active"]
    assert [kind for kind, _ in await engine.outbox()] == ["schedule", "schedule"]  # no send


async def test_a_full_batch_does_not_claim_the_snapshot_as_its_watermark(
    engine: Engine, test_id: str
) -> None:
    small = Projector(engine.pool, CampaignCache(), Planner(BusNames(f"t{test_id}")), batch_size=1)
    await engine.append(engine.event("u1", "a", "a1"), engine.event("u1", "b", "b1"))
    xmax = int(await engine.pool.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))
    assert await small.apply_once() == 1
    assert await store.projection_watermark(engine.pool, "rules") < xmax
    while await small.apply_once():
        pass
    assert await store.projection_watermark(engine.pool, "rules") >= xmax


async def test_a_purchase_cancels_only_the_reminder_of_its_own_cart_at_once(
    engine: Engine,
) -> None:
    await engine.admin.apply(engine.workspace_id, example("abandoned-cart.yaml"))
    await engine.append(
        engine.event("u1", "add_to_cart", "cart-a", cart_id="A", value=20),
        engine.event("u1", "add_to_cart", "cart-b", cart_id="B", value=20),
        engine.event("u1", "purchase", "buy-a", cart_id="A"),
        engine.event("u1", "purchase", "buy-x", cart_id="X"),
    )
    await engine.project()

    instances = {i["correlation"]: i for i in await engine.instances()}
    assert {c: i["state"] for c, i in instances.items()} == {"A": "cancelled", "B": "pending"}
    assert await engine.kinds("u1") == ["triggered", "triggered", "cancelled"]
    timers = await engine.outbox()
    assert ("cancel", instances["A"]["id"]) in timers
    assert ("cancel", instances["B"]["id"]) not in timers
    [cancelled] = [
        d
        for d in await store.decisions_for(engine.pool, engine.workspace_id, "u1", None)
        if d.kind == "cancelled"
    ]
    assert (cancelled.event_id, cancelled.instance_id) == ("buy-a", instances["A"]["id"])

    # Its timer, had it fired anyway, finds the instance cancelled and does nothing.
    await engine.advance_to(instances["A"]["due_at"] + MARGIN)
    await engine.timers.handle(await engine.fire(instances["A"]["id"]))
    assert await engine.kinds("u1") == ["triggered", "triggered", "cancelled"]


async def test_resuming_re_arms_the_instances_that_came_due_while_paused(engine: Engine) -> None:
    await engine.admin.apply(engine.workspace_id, example("abandoned-cart.yaml"))
    await engine.append(
        engine.event("u1", "$identify", "id-1", email="u1@example.test"),
        engine.event("u1", "add_to_cart", "cart-a", cart_id="A", value=20),
        engine.event("u2", "$identify", "id-2", email="u2@example.test"),
    )
    await engine.project()
    await engine.admin.set_status(engine.workspace_id, "abandoned-cart", "paused")
    [instance] = await engine.instances()
    await engine.advance_to(instance["due_at"] + MARGIN)
    await engine.timers.handle(await engine.fire(instance["id"]))
    await engine.append(engine.event("u2", "add_to_cart", "cart-b", cart_id="B", value=20))
    await engine.project()
    assert await engine.kinds("u1") == ["triggered", "paused"]
    assert await engine.kinds("u2") == ["paused"]
    assert [i["state"] for i in await engine.instances()] == ["pending"]
    await engine.pool.execute("DELETE FROM rules_outbox")

    await engine.admin.apply(engine.workspace_id, example("abandoned-cart.yaml"))  # active

    assert await engine.kinds("u1") == ["triggered", "paused", "resumed"]
    assert await engine.outbox() == [
        ("schedule", (instance["id"], (instance["due_at"] + MARGIN).replace(tzinfo=None)))
    ]
