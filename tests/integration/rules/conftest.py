"""The rules engine in-process against real Postgres: the projector, the timer handler and
campaign admin over one pool, with helpers to append events, move the dev clock and fire timers
the way the scheduler does (its fire time and snapshot xmax)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from nudge import db, eventstore
from nudge.bus import BusNames
from nudge.eventstore import NewEvent
from nudge.protoconv import to_timestamp
from nudge.scheduler.v1 import scheduler_pb2
from services.rules import store
from services.rules.application import (
    CampaignAdmin,
    CampaignCache,
    Planner,
    Projector,
    TimerHandler,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "campaigns"
MARGIN = timedelta(seconds=5)


def example(name: str, **overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return document | overrides


@dataclass
class Engine:
    pool: asyncpg.Pool
    admin: CampaignAdmin
    projector: Projector
    timers: TimerHandler
    workspace_id: str
    database_url: str

    def event(self, user_id: str, name: str, event_id: str, **properties: Any) -> NewEvent:
        return NewEvent(self.workspace_id, event_id, user_id, name, None, properties, {}, {})

    async def append(self, *events: NewEvent) -> None:
        for event in events:
            async with self.pool.acquire() as conn, conn.transaction():
                await eventstore.append(conn, [event])

    async def project(self) -> None:
        while await self.projector.apply_once():
            pass
        await self.projector.apply_once()  # an empty poll records the watermark

    async def advance_to(self, moment: datetime) -> None:
        """Set the dev clock so that nudge_now() is `moment` (give or take a few ms)."""
        await self.pool.execute(
            "UPDATE dev_clock SET skew = skew + ($1::timestamptz - nudge_now())", moment
        )

    async def fire(self, instance_id: str) -> scheduler_pb2.TimerFired:
        """What the scheduler publishes when it claims the timer now."""
        row = await self.pool.fetchrow(
            "SELECT nudge_now() AS now, pg_snapshot_xmax(pg_current_snapshot())::text AS xmax"
        )
        assert row is not None
        return scheduler_pb2.TimerFired(
            timer=scheduler_pb2.Timer(timer_id=instance_id, version=1, topic="rules"),
            fired_at=to_timestamp(row["now"]),
            snapshot_xmax=int(row["xmax"]),
        )

    async def instances(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT instance_id::text AS id, user_id, correlation, state, due_at,"
            " trigger_event_id FROM campaign_instances ORDER BY created_at, instance_id"
        )

    async def outbox(self) -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = []
        for row in await self.pool.fetch(
            "SELECT kind, payload FROM rules_outbox ORDER BY outbox_id"
        ):
            payload = bytes(row["payload"])
            if row["kind"] == "schedule":
                timer = scheduler_pb2.ScheduleRequest.FromString(payload).timer
                items.append(("schedule", (timer.timer_id, timer.due_at.ToDatetime())))
            elif row["kind"] == "cancel":
                items.append(("cancel", scheduler_pb2.CancelRequest.FromString(payload).timer_id))
            else:
                items.append((row["kind"], None))
        return items

    async def kinds(self, user_id: str) -> list[str]:
        rows = await store.decisions_for(self.pool, self.workspace_id, user_id, None)
        return [row.kind for row in rows]


@pytest.fixture
async def engine(database_url: str, test_id: str) -> AsyncIterator[Engine]:
    pool = await db.create_pool(database_url, max_size=6, application_name="test-rules")
    try:
        cache = CampaignCache()
        planner = Planner(BusNames(f"t{test_id}"), fire_margin=MARGIN)
        yield Engine(
            pool,
            CampaignAdmin(pool, fire_margin=MARGIN),
            Projector(pool, cache, planner, batch_size=1000),
            TimerHandler(pool, cache, planner, watermark_timeout_s=10),
            f"ws-{test_id}",
            database_url,
        )
    finally:
        await pool.close()
