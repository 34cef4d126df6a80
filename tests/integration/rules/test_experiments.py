"""Experiments in the live projection against real Postgres: assignment at entry (recorded on
the instance, in the decision and as a `$experiment.assigned` event), variant delays and
messages, control users held out at fire time, conversions projected from later events, the
workspace's global control, and replay recomputing every recorded assignment."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from typing import Any

import asyncpg

from nudge.dispatch.v1 import dispatch_pb2
from services.rules import campaign_stats, replay, store
from services.rules.experiments import GlobalControl, assign, parse_experiment
from tests.integration.rules.conftest import MARGIN, Engine, example

EXPERIMENT: dict[str, Any] = {
    "control": 20,
    "variants": [
        {"name": "wait-1h", "weight": 50, "delay": "1h"},
        {
            "name": "wait-24h",
            "weight": 50,
            "delay": "24h",
            "message": {"subject": "Still thinking about it?"},
        },
    ],
}
CONVERSION = {
    "event": "purchase",
    "within": "3d",
    "match": "conversion.properties.cart_id == trigger.properties.cart_id",
}
DELAYS = {"control": timedelta(hours=1), "wait-1h": timedelta(hours=1), "wait-24h": timedelta(1)}


def cart_campaign(**overrides: Any) -> dict[str, Any]:
    # Without the exception: a purchase must convert, not cancel, in this test.
    document = example("abandoned-cart.yaml", experiment=EXPERIMENT, conversion=CONVERSION)
    del document["exceptions"]
    return document | overrides


async def instances(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        """SELECT instance_id::text AS id, user_id, state, due_at, experiment_group,
                  experiment_bucket, experiment_salt, entered_at, exposed_at, send_id::text
           FROM campaign_instances ORDER BY user_id"""
    )


async def dispatched(pool: asyncpg.Pool) -> list[dispatch_pb2.SendRequest]:
    rows = await pool.fetch("SELECT payload FROM rules_outbox WHERE kind = 'dispatch'")
    return [dispatch_pb2.SendRequest.FromString(bytes(r["payload"])) for r in rows]


async def fill_carts(engine: Engine, users: int) -> None:
    for n in range(users):
        await engine.append(
            engine.event(f"u{n:03}", "$identify", f"id-{n}", email=f"u{n}@example.test"),
            engine.event(f"u{n:03}", "add_to_cart", f"cart-{n}", cart_id=f"c{n}", value=40),
        )
    await engine.project()


async def fire_all(engine: Engine) -> None:
    for row in await instances(engine.pool):
        if row["state"] == "pending":
            await engine.advance_to(row["due_at"] + MARGIN)
            await engine.timers.handle(await engine.fire(row["id"]))


async def test_entry_assigns_groups_that_replay_recomputes(engine: Engine) -> None:
    await engine.admin.apply(engine.workspace_id, cart_campaign())
    await fill_carts(engine, 60)

    rows = await instances(engine.pool)
    assert len(rows) == 60
    experiment = parse_experiment(EXPERIMENT)
    for row in rows:
        expected = assign(engine.workspace_id, "abandoned-cart", row["user_id"], experiment)
        assert (row["experiment_group"], row["experiment_bucket"]) == (
            expected.group,
            expected.bucket,
        )
        assert row["experiment_salt"] == ""
        assert row["due_at"] - row["entered_at"] == DELAYS[row["experiment_group"]]
    groups = Counter(row["experiment_group"] for row in rows)
    assert set(groups) == {"control", "wait-1h", "wait-24h"}

    events = await engine.pool.fetch(
        "SELECT user_id, event_id, properties FROM events WHERE name = '$experiment.assigned'"
        " AND workspace_id = $1",
        engine.workspace_id,
    )
    by_user = {row["user_id"]: row for row in rows}
    assert len(events) == 60
    for event in events:
        props = event["properties"]
        assert event["event_id"] == f"assigned:{by_user[event['user_id']]['id']}"
        assert props["group"] == by_user[event["user_id"]]["experiment_group"]
        assert props["campaign_id"] == "abandoned-cart"

    # The assigned events are projected too, without counting as user activity.
    await engine.project()
    report = await replay.verify_projection(engine.pool, engine.workspace_id)
    assert report.match, report.mismatches
    assert report.assignments == 60

    # A recorded assignment that the definition does not give is found.
    props = dict(events[0]["properties"])
    wrong = "wait-24h" if props["group"] == "wait-1h" else "wait-1h"
    forged = engine.event(
        str(events[0]["user_id"]), "$experiment.assigned", "forged", **(props | {"group": wrong})
    )
    await engine.append(forged)
    await engine.project()
    report = await replay.verify_projection(engine.pool, engine.workspace_id)
    assert not report.match
    assert [m.problem for m in report.mismatches] == ["assignment"]


async def test_control_is_held_out_and_variants_get_their_message(engine: Engine) -> None:
    await engine.admin.apply(engine.workspace_id, cart_campaign())
    await fill_carts(engine, 40)
    await fire_all(engine)

    rows = await instances(engine.pool)
    sends = {request.user_id: request for request in await dispatched(engine.pool)}
    for row in rows:
        group = row["experiment_group"]
        assert row["exposed_at"] is not None
        assert row["send_id"] is not None
        if group == "control":
            assert row["state"] == "held_out"
            assert row["user_id"] not in sends
            [held] = [
                d
                for d in await store.decisions_for(
                    engine.pool, engine.workspace_id, row["user_id"], None
                )
                if d.kind == "held_out"
            ]
            assert held.detail["send_id"] == row["send_id"]
        else:
            assert row["state"] == "sent"
            request = sends[row["user_id"]]
            assert request.experiment_group == group
            assert request.send_id == row["send_id"]
            expected = (
                "Still thinking about it?"
                if group == "wait-24h"
                else "You left something in your cart"
            )
            assert request.template["subject"] == expected
    assert len(sends) == sum(1 for row in rows if row["experiment_group"] != "control")


async def test_conversions_are_projected_per_instance_and_matched(engine: Engine) -> None:
    await engine.admin.apply(engine.workspace_id, cart_campaign())
    await fill_carts(engine, 6)
    rows = {row["user_id"]: row for row in await instances(engine.pool)}
    # u000 buys the same cart two hours later, u001 another cart, u002 the same cart twice,
    # u003 the same cart after the horizon (24h longest delay + 3d), u004 nothing.
    start = min(row["entered_at"] for row in rows.values())
    await engine.advance_to(start + timedelta(hours=2))
    await engine.append(
        engine.event("u000", "purchase", "p0", cart_id="c0"),
        engine.event("u001", "purchase", "p1", cart_id="other"),
        engine.event("u002", "purchase", "p2a", cart_id="c2"),
        engine.event("u002", "purchase", "p2b", cart_id="c2"),
    )
    await engine.project()
    await engine.advance_to(start + timedelta(days=4, hours=1))
    await engine.append(engine.event("u003", "purchase", "p3", cart_id="c3"))
    await engine.project()
    await engine.project()  # a re-run changes nothing

    found = await engine.pool.fetch(
        "SELECT user_id, event_id, instance_id::text FROM campaign_conversions"
        " ORDER BY user_id, event_id"
    )
    assert [(r["user_id"], r["event_id"]) for r in found] == [
        ("u000", "p0"),
        ("u002", "p2a"),
        ("u002", "p2b"),
    ]
    assert {r["instance_id"] for r in found} == {rows["u000"]["id"], rows["u002"]["id"]}


async def test_global_control_holds_users_out_of_marketing_only(engine: Engine) -> None:
    policy = {"global_control": {"percent": 30, "salt": "g1"}}
    await engine.pool.execute(
        "INSERT INTO workspaces (workspace_id, name) VALUES ($1, $1) ON CONFLICT DO NOTHING",
        engine.workspace_id,
    )
    await engine.pool.execute(
        "INSERT INTO workspace_policies (workspace_id, policy, version) VALUES ($1, $2, 1)",
        engine.workspace_id,
        json.loads(json.dumps(policy)),
    )
    plain = example("abandoned-cart.yaml")
    await engine.admin.apply(engine.workspace_id, plain)
    transactional = example("order-shipped.yaml") | {"kind": "transactional"}
    await engine.admin.apply(engine.workspace_id, transactional)
    for n in range(40):
        user = f"u{n:03}"
        await engine.append(
            engine.event(user, "$identify", f"id-{n}", email=f"u{n}@example.test"),
            engine.event(user, "add_to_cart", f"cart-{n}", cart_id=f"c{n}", value=40),
            engine.event(user, "order_shipped", f"ship-{n}", order_id=f"o{n}", total=50),
        )
    await engine.project()
    await fire_all(engine)

    control = GlobalControl(30, "g1")
    rows = await engine.pool.fetch(
        "SELECT user_id, campaign_id, state, experiment_group FROM campaign_instances"
    )
    held = {
        r["user_id"]
        for r in rows
        if r["campaign_id"] == "abandoned-cart" and r["state"] == "held_out"
    }
    expected = {
        f"u{n:03}"
        for n in range(40)
        if assign(engine.workspace_id, "x", f"u{n:03}", None, global_control=control).held_out
    }
    assert held == expected
    assert 0 < len(held) < 40
    assert all(
        r["state"] != "held_out" and r["experiment_group"] == "treatment"
        for r in rows
        if r["campaign_id"] == "order-shipped"
    )
    assigned = await engine.pool.fetch(
        "SELECT user_id, properties FROM events WHERE name = '$experiment.assigned'"
    )
    assert {r["user_id"] for r in assigned} == held
    assert all(r["properties"]["global_control"] == {"percent": 30, "salt": "g1"} for r in assigned)
    report = await replay.verify_projection(engine.pool, engine.workspace_id)
    assert report.match
    assert report.assignments == len(held)


async def test_assignment_survives_new_versions_and_a_new_salt_resets_it(engine: Engine) -> None:
    experiment = parse_experiment(EXPERIMENT)
    users = [f"u{n:03}" for n in range(40)]

    async def fill(tag: str) -> dict[str, tuple[str, str, int]]:
        for user in users:
            await engine.append(
                engine.event(
                    user, "add_to_cart", f"{tag}-{user}", cart_id=f"{tag}-{user}", value=40
                )
            )
        await engine.project()
        rows = await engine.pool.fetch(
            """SELECT user_id, experiment_group, experiment_salt, version FROM campaign_instances
               WHERE trigger_event_id LIKE $1 || '-%'""",
            tag,
        )
        return {
            r["user_id"]: (r["experiment_group"], r["experiment_salt"], r["version"]) for r in rows
        }

    await engine.admin.apply(engine.workspace_id, cart_campaign())
    for user in users:
        await engine.append(engine.event(user, "$identify", f"id-{user}", email=f"{user}@x.test"))
    first = await fill("v1")
    # A new version (another subject and delay) moves nobody.
    await engine.admin.apply(engine.workspace_id, cart_campaign(name="Cart, v2", delay="2h"))
    second = await fill("v2")
    assert {u: g for u, (g, _, _) in second.items()} == {u: g for u, (g, _, _) in first.items()}
    assert {v for _, _, v in first.values()} == {1}
    assert {v for _, _, v in second.values()} == {2}

    # A new salt is a reset: every user is drawn again with it.
    await engine.admin.apply(
        engine.workspace_id, cart_campaign(experiment=EXPERIMENT | {"salt": "reset-1"})
    )
    third = await fill("v3")
    salted = parse_experiment(EXPERIMENT | {"salt": "reset-1"})
    for user, (group, salt, version) in third.items():
        assert (salt, version) == ("reset-1", 3)
        assert group == assign(engine.workspace_id, "abandoned-cart", user, salted).group
    moved = sum(third[u][0] != first[u][0] for u in users)
    assert moved > 0
    assert all(
        first[u][0] == assign(engine.workspace_id, "abandoned-cart", u, experiment).group
        for u in users
    )

    # The stats count the entries of the current salt only.
    report = await campaign_stats.campaign_stats(engine.pool, engine.workspace_id, "abandoned-cart")
    assert report.salt == "reset-1"
    assert sum(group.instances for group in report.groups) == len(users)
    assert {g.group: g.entered for g in report.groups} == dict(
        Counter(group for group, _, _ in third.values())
    )


async def test_an_inactivity_entry_starts_when_the_user_became_inactive(engine: Engine) -> None:
    """A win-back's conversion is the activity that also re-arms it: only activity after the
    user qualified (`for` without a session) may count, or every re-armed user converts."""
    campaign = example(
        "win-back.yaml",
        experiment={"control": 50},
        conversion={"event": "session_start", "within": "3d"},
    )
    await engine.admin.apply(engine.workspace_id, campaign)
    await engine.append(
        engine.event("u1", "$identify", "id-1", email="u1@example.test"),
        engine.event("u1", "session_start", "s1"),
    )
    await engine.project()
    [armed] = await instances(engine.pool)
    assert armed["entered_at"] == armed["due_at"]  # no delay: qualifies when it is due

    await engine.advance_to(armed["due_at"] - timedelta(days=11))
    await engine.append(engine.event("u1", "session_start", "s2"))  # re-arms; not a conversion
    await engine.project()
    [rearmed] = await instances(engine.pool)
    assert rearmed["entered_at"] - armed["entered_at"] >= timedelta(days=3)
    assert rearmed["entered_at"] == rearmed["due_at"]

    await engine.advance_to(rearmed["due_at"] + MARGIN)
    await engine.timers.handle(await engine.fire(rearmed["id"]))
    await engine.advance_to(rearmed["due_at"] + timedelta(days=1))
    await engine.append(engine.event("u1", "session_start", "s3"))  # back: converted
    await engine.project()

    conversions = await engine.pool.fetch(
        "SELECT instance_id::text, event_id FROM campaign_conversions"
    )
    assert [(r["instance_id"], r["event_id"]) for r in conversions] == [(rearmed["id"], "s3")]
