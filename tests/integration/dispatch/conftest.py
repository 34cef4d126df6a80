"""An in-process Dispatcher against a real Postgres and real protocol peers on 127.0.0.1.

Time is the database's (`nudge_now()`); tests move it with the dev clock, as `nudge time
advance` does, and drive the sweeper by hand instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import nats
import pytest
from nats.js import JetStreamContext

from nudge import db
from nudge.auth import ensure_workspace
from nudge.bus import BusNames, ensure_streams, trace_headers
from nudge.clock import DbClock
from nudge.dispatch.v1 import dispatch_pb2
from nudge.ids import deterministic_id
from nudge.protoconv import dict_to_struct, to_timestamp
from nudge.testing.sinks import HttpSink, SmtpSink
from services.dispatch.application import Dispatcher
from services.dispatch.channels.base import Channel
from services.dispatch.channels.email import SmtpChannel
from services.dispatch.channels.webhook import WebhookChannel
from services.dispatch.consumers import consume_send_requests
from services.dispatch.unsubscribe import UnsubscribeLinks

WORKSPACE = "acme"
WEBHOOK_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
UNSUBSCRIBE_URL = "https://nudge.example/unsubscribe"


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def http() -> Iterator[HttpSink]:
    sink = HttpSink().start()
    yield sink
    sink.stop()


@dataclass
class Rig:
    """A dispatcher, its pool and clock, and helpers to plan sends and move time."""

    pool: asyncpg.Pool
    clock: DbClock
    dispatcher: Dispatcher
    smtp: SmtpSink
    http: HttpSink
    links: UnsubscribeLinks
    pool_dsn: str
    counter: int = 0
    extra: list[Dispatcher] = field(default_factory=list)
    pools: list[asyncpg.Pool] = field(default_factory=list)

    def request(
        self,
        *,
        user: str = "ann",
        channel: str = "email",
        kind: str = "marketing",
        priority: int = 0,
        campaign: str = "promo",
        decided_at: datetime | None = None,
        template: dict[str, str] | None = None,
        traits: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> dispatch_pb2.SendRequest:
        """A SendRequest like the rules planner builds (a fresh send id unless `key`)."""
        self.counter += 1
        send_id = str(deterministic_id("test-send", key or f"{user}-{self.counter}"))
        if template is None:
            template = (
                {"url": f"{self.http.url}/hook", "payload": '{"user": "{{ user.id }}"}'}
                if channel == "webhook"
                else {
                    "to": "{{ user.traits.email }}",
                    "subject": "Hello {{ user.id }} #" + str(self.counter),
                    "body": "Hi there",
                }
            )
        context = {
            "user": {"id": user, "traits": {"email": f"{user}@example.test", **(traits or {})}},
            "event": {"name": "order_paid", "properties": {}},
            "campaign": {"id": campaign, "name": campaign, "version": 1},
        }
        request = dispatch_pb2.SendRequest(
            send_id=send_id,
            workspace_id=WORKSPACE,
            user_id=user,
            campaign_id=campaign,
            campaign_version=1,
            channel=channel,
            template=template,
            context=dict_to_struct(context),
            trigger_event_id=f"ev-{self.counter}",
            kind=kind,
            priority=priority,
        )
        if decided_at is not None:
            request.decided_at.CopyFrom(to_timestamp(decided_at))
        return request

    async def now(self) -> datetime:
        return await db.db_now(self.pool)

    async def set_time(self, when: datetime) -> None:
        """Move the database clock to `when`."""
        await self.pool.execute(
            "UPDATE dev_clock SET skew = $1 - clock_timestamp() WHERE singleton", when
        )
        await self.clock.sync()

    async def advance(self, step: timedelta) -> None:
        """`nudge time advance`."""
        await self.pool.execute("UPDATE dev_clock SET skew = skew + $1 WHERE singleton", step)
        await self.clock.sync()

    async def sweep(self) -> int:
        """One sweeper pass, waiting for the attempts it started."""
        started = await self.dispatcher.sweep_once()
        await self.dispatcher.lanes.wait_idle()
        return started

    async def run_until_settled(self, step: timedelta, rounds: int = 20) -> None:
        """Skip time in `step`s and sweep until no send is open."""
        for _ in range(rounds):
            if not await self.pool.fetchval(
                "SELECT count(*) FROM sends WHERE state IN"
                " ('planned', 'claimed', 'attempting', 'retry_wait')"
            ):
                return
            await self.advance(step)
            await self.sweep()
        raise AssertionError("sends did not settle")

    async def send(self, send_id: str) -> asyncpg.Record:
        row = await self.pool.fetchrow("SELECT * FROM sends WHERE send_id = $1::uuid", send_id)
        assert row is not None
        return row

    async def events(self, name: str, user: str = "ann") -> list[asyncpg.Record]:
        return list(
            await self.pool.fetch(
                "SELECT * FROM events WHERE name = $1 AND user_id = $2 ORDER BY global_position",
                name,
                user,
            )
        )

    async def identify(self, user: str, traits: dict[str, Any]) -> None:
        """Append an `$identify` like ingest does (the inline projection applies it)."""
        from nudge import eventstore

        self.counter += 1
        async with self.pool.acquire() as conn, conn.transaction():
            await eventstore.append(
                conn,
                [
                    eventstore.NewEvent(
                        workspace_id=WORKSPACE,
                        event_id=f"identify-{self.counter}",
                        user_id=user,
                        name="$identify",
                        occurred_at=None,
                        properties=traits,
                        context={},
                        metadata={},
                    )
                ],
            )

    async def apply_policy(self, document: dict[str, Any]) -> None:
        from services.dispatch.application import apply_policy

        await apply_policy(self.pool, WORKSPACE, document)

    async def replica(self) -> Dispatcher:
        """A second dispatcher with its own pool (another replica)."""
        pool = await db.create_pool(self.pool_dsn, max_size=10)
        self.pools.append(pool)
        replica = make_dispatcher(pool, self.clock, self.smtp, self.http, self.links)
        self.extra.append(replica)
        return replica


def make_dispatcher(
    pool: asyncpg.Pool,
    clock: DbClock,
    smtp: SmtpSink,
    http: HttpSink,
    links: UnsubscribeLinks,
    *,
    webhook_timeout_s: float = 2.0,
    concurrency: int = 8,
) -> Dispatcher:
    channels: dict[str, Channel] = {
        "email": SmtpChannel(smtp.url, "Nudge <noreply@nudge.test>", timeout_s=2),
        "webhook": WebhookChannel(
            WEBHOOK_SECRET,
            timeout_s=webhook_timeout_s,
            total_timeout_s=webhook_timeout_s,
            allow_private_hosts=["127.0.0.1"],
        ),
    }
    return Dispatcher(
        pool,
        channels,
        clock,
        lease=timedelta(seconds=30),
        retry_window=timedelta(hours=1),
        rng=random.Random(7),
        channel_concurrency=concurrency,
        unsubscribe_links=links,
    )


@pytest.fixture
async def rig(database_url: str, smtp: SmtpSink, http: HttpSink) -> AsyncIterator[Rig]:
    pool = await db.create_pool(database_url, max_size=20)
    async with pool.acquire() as conn:
        await ensure_workspace(conn, WORKSPACE)
        await conn.execute("UPDATE dev_clock SET enabled = true")
    clock = DbClock(pool)
    await clock.sync()
    links = UnsubscribeLinks(b"k" * 32, UNSUBSCRIBE_URL)
    dispatcher = make_dispatcher(pool, clock, smtp, http, links)
    rig = Rig(pool, clock, dispatcher, smtp, http, links, database_url)
    try:
        yield rig
    finally:
        for each in [dispatcher, *rig.extra]:
            await each.drain(1.0)
            for channel in each._channels.values():
                await channel.aclose()
        for extra_pool in rig.pools:
            await extra_pool.close()
        await pool.close()


async def publish(js: JetStreamContext, names: BusNames, request: dispatch_pb2.SendRequest) -> None:
    """Publish a send request as the rules outbox does."""
    await js.publish(
        names.dispatch_subject(request.workspace_id, request.channel),
        request.SerializeToString(),
        headers=trace_headers(request.send_id),
    )


@contextlib.asynccontextmanager
async def jetstream(nats_url: str, names: BusNames) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on the test's nats-server, with the streams of `names` created."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, names)
        yield js
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def consuming(
    js: JetStreamContext, names: BusNames, dispatcher: Dispatcher, *, ack_wait_s: float = 60.0
) -> AsyncIterator[None]:
    """Run dispatch's send-request consumer while the block runs."""
    consumer = asyncio.create_task(
        consume_send_requests(js, names, dispatcher, ack_wait_s=ack_wait_s)
    )
    try:
        yield
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
