"""Backtest against real Postgres: the consent twin equals the SQL trigger it mirrors, and a
backtest of a campaign over a recorded history matches what the same campaign did live over
that history (projector and timer handler in-process, as in test_timers_and_exceptions.py),
while writing nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

from nudge import db, eventstore
from nudge.bus import BusNames
from nudge.eventstore import NewEvent
from nudge.protoconv import to_timestamp
from nudge.scheduler.v1 import scheduler_pb2
from services.dispatch import store as dispatch_store
from services.dispatch.recipient_twin import RecipientFacts, project_recipient
from services.rules.application import (
    CampaignAdmin,
    CampaignCache,
    Planner,
    Projector,
    TimerHandler,
)
from services.rules.backtest import run_backtest
from services.rules.grpc_api import _backtest_response

EMAIL = {"channel": "email", "to": "{{ user.traits.email }}", "subject": "s", "body": "b"}

CART = {
    "id": "cart-test",
    "trigger": {"event": "add_to_cart", "where": "event.properties.value >= 10"},
    "correlation_key": "cart_id",
    "delay": "1h",
    "reeligibility": "0s",
    "exceptions": [
        {
            "event": "purchase",
            "match": "exception.properties.cart_id == trigger.properties.cart_id",
        }
    ],
    "experiment": {
        "control": 25,
        "variants": [{"name": "soon", "weight": 1}, {"name": "later", "weight": 1, "delay": "2h"}],
    },
    "message": EMAIL,
}

WIN_BACK = {
    "id": "quiet-test",
    "trigger": {"inactivity": {"event": "session_start", "for": "2h"}},
    "reeligibility": "1h",
    "message": EMAIL,
}


@dataclass
class Live:
    pool: asyncpg.Pool
    admin: CampaignAdmin
    projector: Projector
    timers: TimerHandler
    workspace_id: str

    def event(self, user_id: str, name: str, event_id: str, **properties: Any) -> NewEvent:
        return NewEvent(self.workspace_id, event_id, user_id, name, None, properties, {}, {})

    async def now(self) -> datetime:
        value = await self.pool.fetchval("SELECT nudge_now()")
        assert isinstance(value, datetime)
        return value

    async def advance_to(self, moment: datetime) -> None:
        await self.pool.execute(
            "UPDATE dev_clock SET skew = skew + ($1::timestamptz - nudge_now())", moment
        )

    async def project(self) -> None:
        while await self.projector.apply_once():
            pass
        await self.projector.apply_once()

    async def append_at(self, moment: datetime, *events: NewEvent) -> None:
        """Fire what comes due before `moment`, then append `events` at `moment`."""
        await self.run_until(moment)
        await self.advance_to(moment)
        for event in events:
            async with self.pool.acquire() as conn, conn.transaction():
                await eventstore.append(conn, [event])
        await self.project()

    async def run_until(self, moment: datetime) -> None:
        """Fire every pending instance due before `moment`, in due order, at its due time."""
        while True:
            row = await self.pool.fetchrow(
                "SELECT instance_id::text AS id, due_at FROM campaign_instances"
                " WHERE state = 'pending' AND due_at < $1 ORDER BY due_at, instance_id LIMIT 1",
                moment,
            )
            if row is None:
                return
            await self.advance_to(row["due_at"])
            await self.project()
            fire = await self.pool.fetchrow(
                "SELECT nudge_now() AS now, pg_snapshot_xmax(pg_current_snapshot())::text AS xmax"
            )
            assert fire is not None
            await self.timers.handle(
                scheduler_pb2.TimerFired(
                    timer=scheduler_pb2.Timer(timer_id=row["id"], version=1, topic="rules"),
                    fired_at=to_timestamp(fire["now"]),
                    snapshot_xmax=int(fire["xmax"]),
                )
            )
            await self.project()


@pytest.fixture
async def live(database_url: str, test_id: str) -> AsyncIterator[Live]:
    pool = await db.create_pool(database_url, max_size=6, application_name="test-backtest")
    try:
        cache = CampaignCache()
        planner = Planner(BusNames(f"t{test_id}"))  # no fire margin: timers fire at due time
        yield Live(
            pool,
            CampaignAdmin(pool),
            Projector(pool, cache, planner, batch_size=1000),
            TimerHandler(pool, cache, planner, watermark_timeout_s=10),
            f"ws-{test_id}",
        )
    finally:
        await pool.close()


async def row_counts(pool: asyncpg.Pool) -> dict[str, int]:
    tables = await pool.fetch(
        "SELECT quote_ident(relname) AS name FROM pg_class"
        " WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace ORDER BY relname"
    )
    counts: dict[str, int] = {}
    for table in tables:
        counts[table["name"]] = await pool.fetchval(f"SELECT count(*) FROM {table['name']}")
    return counts


def live_key(row: asyncpg.Record) -> tuple[Any, ...]:
    """A live decision on the fields that do not depend on the version or the fire delay."""
    detail = row["detail"]
    kind = row["kind"]
    timed = kind in ("triggered", "rearmed")
    return (
        kind,
        row["event_id"],
        detail.get("due_at") if timed else None,
        detail.get("branch"),
        detail.get("group") if kind == "triggered" else None,
    )


# --- the consent twin -------------------------------------------------------------------------


async def test_the_twin_gives_what_the_sql_trigger_projects(live: Live) -> None:
    histories: dict[str, list[tuple[str, dict[str, Any]]]] = {
        "a": [
            (
                "$identify",
                {
                    "email_subscribe": " Opted_In",
                    "push_subscribe": True,
                    "sms_subscribe": 5,
                    "timezone": "Europe/Paris",
                },
            ),
            ("$identify", {"push_subscribe": None}),
            ("$identify", {"timezone": 3}),
        ],
        "b": [
            ("message.failed", {"channel": "email", "undeliverable_address": "x@y.test"}),
            ("message.failed", {"channel": "push", "undeliverable_address": "tok"}),
            ("message.failed", {"channel": "email", "undeliverable_address": "x@y.test"}),
            ("$identify", {"email_subscribe": "opted_in"}),
            ("message.failed", {"undeliverable_address": 5}),
            ("message.failed", {"undeliverable_address": "nochannel"}),
            ("message.failed", {"channel": "sms"}),
        ],
        "c": [
            ("$identify", {}),
            ("$identify", {"sms_subscribe": "subscribed", "timezone": "x" * 70}),
        ],
        "d": [
            ("$identify", {"email_subscribe": False, "push_subscribe": "  UNSUBSCRIBED"}),
            ("$identify", {"push_subscribe": "opted_in", "email_subscribe": [1]}),
        ],
        "e": [
            ("message.failed", {"channel": "sms", "undeliverable_address": "+100"}),
            ("message.failed", {"channel": "webhook", "undeliverable_address": "h"}),
            ("$identify", {"webhook_subscribe": "opted_in"}),
            ("$identify", {"sms_subscribe": "opted_in", "webhook_subscribe": "opted_in"}),
            ("message.failed", {"channel": "email", "undeliverable_address": "e@x.test"}),
        ],
        "f": [("page_view", {"email_subscribe": "unsubscribed"})],
    }
    for user, history in histories.items():
        for index, (name, properties) in enumerate(history):
            async with live.pool.acquire() as conn, conn.transaction():
                await eventstore.append(
                    conn, [live.event(user, name, f"{user}-{index}", **properties)]
                )
    for user in histories:
        rows = await live.pool.fetch(
            "SELECT name, properties FROM events WHERE workspace_id = $1 AND user_id = $2"
            " ORDER BY tx_id, global_position",
            live.workspace_id,
            user,
        )
        facts = RecipientFacts()
        for row in rows:
            facts = project_recipient(facts, row["name"], row["properties"])
        stored = await dispatch_store.recipient(live.pool, live.workspace_id, user)
        assert facts.recipient() == stored, user
    # The cases above do exercise the rules (a sanity check on the expected values).
    stored_b = await dispatch_store.recipient(live.pool, live.workspace_id, "b")
    assert stored_b.undeliverable == {"push": frozenset({"tok"}), "": frozenset({"nochannel"})}
    stored_e = await dispatch_store.recipient(live.pool, live.workspace_id, "e")
    assert stored_e.undeliverable == {"email": frozenset({"e@x.test"})}


# --- live versus backtest ---------------------------------------------------------------------


async def test_a_backtest_matches_what_the_campaign_did_live_and_writes_nothing(
    live: Live,
) -> None:
    t0 = (await live.now()).replace(microsecond=0) + timedelta(seconds=1)
    before = t0 - timedelta(days=1)
    e = live.event
    # History before the campaigns exist: builds state, starts nothing.
    await live.append_at(
        before,
        e("u1", "add_to_cart", "old-cart", cart_id="P", value=20),
        e("u3", "$identify", "u3-id", email="u3@example.test", email_subscribe="unsubscribed"),
        e("u2", "session_start", "u2-old-session"),
    )
    await live.advance_to(t0)
    for document in (CART, WIN_BACK):
        await live.admin.apply(live.workspace_id, document)
    start = await live.pool.fetchval(
        "SELECT max(created_at) FROM campaign_versions WHERE workspace_id = $1", live.workspace_id
    )
    assert isinstance(start, datetime)
    at = start + timedelta(minutes=1)

    def minutes(value: float) -> datetime:
        return at + timedelta(minutes=value)

    shoppers = [f"s{i}" for i in range(12)]
    await live.append_at(
        minutes(5),
        e("u1", "session_start", "u1-s1"),
        e("u1", "add_to_cart", "u1-a", cart_id="A", value=20),
        e("u1", "add_to_cart", "u1-b", cart_id="B", value=30),
        e("u2", "add_to_cart", "u2-c", cart_id="C", value=20),
        e("u3", "add_to_cart", "u3-d", cart_id="D", value=50),
        e("u4", "add_to_cart", "u4-cheap", cart_id="E", value=5),
        *[e(s, "add_to_cart", f"{s}-cart", cart_id="S", value=15) for s in shoppers],
    )
    await live.append_at(minutes(20), e("u2", "session_start", "u2-s1"))
    await live.append_at(
        minutes(30),
        e("u1", "purchase", "u1-buy-a", cart_id="A"),
        e("u2", "purchase", "u2-buy-x", cart_id="X"),
    )
    await live.append_at(minutes(60), e("u1", "session_start", "u1-s2"))
    await live.append_at(minutes(95), e("u2", "add_to_cart", "u2-c2", cart_id="C", value=25))
    await live.append_at(minutes(200), e("u1", "add_to_cart", "u1-f", cart_id="F", value=99))
    await live.append_at(minutes(330), e("u3", "add_to_cart", "u3-late", cart_id="L", value=10))
    end = minutes(360)
    await live.run_until(end)

    counts = await row_counts(live.pool)
    reports = {
        document["id"]: await run_backtest(live.pool, live.workspace_id, document, start, end)
        for document in (CART, WIN_BACK)
    }
    assert await row_counts(live.pool) == counts  # the backtest wrote nothing

    for campaign_id, report in reports.items():
        rows = await live.pool.fetch(
            "SELECT user_id, kind, event_id, detail FROM decisions"
            " WHERE workspace_id = $1 AND campaign_id = $2 ORDER BY decision_id",
            live.workspace_id,
            campaign_id,
        )
        live_decisions: dict[str, list[tuple[Any, ...]]] = {}
        for row in rows:
            live_decisions.setdefault(row["user_id"], []).append(live_key(row))
        simulated: dict[str, list[tuple[Any, ...]]] = {}
        for decision in report.decisions:
            timed = decision.kind in ("triggered", "rearmed")
            simulated.setdefault(decision.user_id, []).append(
                (
                    decision.kind,
                    decision.event_id,
                    decision.due_at.isoformat() if timed and decision.due_at else None,
                    decision.branch,
                    decision.group if decision.kind == "triggered" else None,
                )
            )
        assert simulated == live_decisions, campaign_id

        live_instances = await live.pool.fetch(
            "SELECT user_id, trigger_event_id, state, experiment_group FROM campaign_instances"
            " WHERE workspace_id = $1 AND campaign_id = $2",
            live.workspace_id,
            campaign_id,
        )
        entered: dict[str, set[str]] = {}
        for instance in live_instances:
            entered.setdefault(instance["experiment_group"], set()).add(instance["user_id"])
        assert {g: set(users) for g, users in report.entered.items()} == entered
        assert report.cancelled_by_exception == sum(
            1 for i in live_instances if i["state"] == "cancelled"
        )
        assert report.pending_at_end == sum(1 for i in live_instances if i["state"] == "pending")
        exposed = sorted(
            (i["user_id"], i["trigger_event_id"], i["state"])
            for i in live_instances
            if i["state"] in ("sent", "held_out")
        )
        assert exposed == sorted(
            (s.user_id, s.trigger_event_id, "held_out" if s.outcome == "held_out" else "sent")
            for s in report.sends
        )

    cart = reports["cart-test"]
    assert cart.cancelled_by_exception == 1  # u1's cart A
    assert cart.pending_at_end == 1  # u3's late cart
    assert "u4" not in {user for users in cart.entered.values() for user in users}
    assert {"control", "soon", "later"} <= set(cart.entered)
    assert "u1" not in {e.user_id for e in cart.entries if e.event_id == "old-cart"}
    [u3_send] = [s for s in cart.sends if s.user_id == "u3"]
    if u3_send.group != "control":  # u3 unsubscribed before the period
        assert (u3_send.outcome, u3_send.code) == ("suppressed", "unsubscribed")
    quiet = reports["quiet-test"]
    assert quiet.decision_counts.get("rearmed", 0) >= 1
    assert {s.user_id for s in quiet.sends} >= {"u1"}

    response = _backtest_response(cart)
    assert response.sends_count == len(cart.sends)
    assert sum(group.users_count for group in response.groups) == sum(
        len(users) for users in cart.entered.values()
    )
