"""The store relay against real Postgres and JetStream: order, exactly-once, crash re-publish."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck

from nudge import bus, db, eventstore
from nudge.eventstore import Cursor, NewEvent, StoredEvent
from nudge.ingest.v1 import ingest_pb2
from services.ingest.relay import (
    MAX_BYTES_PER_MESSAGE,
    MAX_EVENTS_PER_MESSAGE,
    READER,
    Relay,
    chunk_messages,
)


@dataclass(frozen=True)
class Published:
    """One message of the events stream."""

    seq: int
    subject: str
    msg_id: str
    batch: ingest_pb2.EventBatch

    @property
    def keys(self) -> list[tuple[str, str]]:
        return [(e.workspace_id, e.event_id) for e in self.batch.events]


class RecordingJetStream:
    """Publishes for real and records what each publish was and what JetStream answered."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.msg_ids: list[str] = []
        self.acks: list[PubAck] = []

    async def publish(
        self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None
    ) -> PubAck:
        assert headers is not None
        self.msg_ids.append(headers["Nats-Msg-Id"])
        ack = await self._js.publish(subject, payload, headers=headers)
        self.acks.append(ack)
        return ack


class SimulatedCrashError(Exception):
    """The relay process 'dies' after its messages reached JetStream."""


class CrashAfterPublishJetStream(RecordingJetStream):
    """Every publish reaches JetStream; then one of them fails, so the checkpoint is never saved."""

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js)
        self.in_flight = 0
        self._crashed = False

    async def publish(
        self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None
    ) -> PubAck:
        self.in_flight += 1
        try:
            ack = await super().publish(subject, payload, headers)
        finally:
            self.in_flight -= 1
        if not self._crashed:
            self._crashed = True
            raise SimulatedCrashError
        return ack


@dataclass
class RelayRig:
    database_url: str
    pool: asyncpg.Pool
    js: JetStreamContext
    names: bus.BusNames
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def relay(self, js: Any = None, *, batch_size: int = 2000) -> Relay:
        return Relay(self.pool, js or self.js, self.names, asyncio.Event(), batch_size=batch_size)

    async def append(self, *batches: Sequence[NewEvent]) -> None:
        """Each batch in its own transaction."""
        for batch in batches:
            async with self.pool.acquire() as conn, conn.transaction():
                await eventstore.append(conn, batch)

    async def store_order(self) -> list[tuple[str, str]]:
        rows = await self.pool.fetch(
            "SELECT workspace_id, event_id FROM events ORDER BY tx_id, global_position"
        )
        return [(r["workspace_id"], r["event_id"]) for r in rows]

    async def published(self) -> list[Published]:
        info = await self.js.stream_info(self.names.events_stream)
        messages = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            raw = await self.js.get_msg(self.names.events_stream, seq)
            assert raw.subject is not None
            assert raw.headers is not None
            assert raw.data is not None
            messages.append(
                Published(
                    seq,
                    raw.subject,
                    raw.headers["Nats-Msg-Id"],
                    ingest_pb2.EventBatch.FromString(raw.data),
                )
            )
        return messages

    async def message_count(self) -> int:
        info = await self.js.stream_info(self.names.events_stream)
        return info.state.messages

    async def checkpoint(self) -> asyncpg.Record:
        row = await self.pool.fetchrow(
            "SELECT tx_id::text AS tx, global_position, pending_tx_id::text AS ptx,"
            " pending_position FROM reader_checkpoints WHERE reader = $1",
            READER,
        )
        assert row is not None
        return row

    async def drain(self, relay: Relay) -> int:
        total = 0
        while published := await relay.publish_once():
            total += published
        return total

    def start(self, relay: Relay) -> None:
        self._tasks.append(asyncio.create_task(relay.run(self.database_url), name="relay"))

    async def stop_all(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
async def nats_client(nats_url: str) -> AsyncIterator[NatsClient]:
    nc = await bus.connect(nats_url, "relay-test")
    yield nc
    await nc.close()


@pytest.fixture
async def rig(database_url: str, nats_client: NatsClient, test_id: str) -> AsyncIterator[RelayRig]:
    names = bus.BusNames(f"t{test_id}")
    js = nats_client.jetstream()
    await bus.ensure_streams(js, names)
    pool = await db.create_pool(database_url, max_size=6, application_name="test-relay")
    rig = RelayRig(database_url, pool, js, names)
    try:
        yield rig
    finally:
        await rig.stop_all()
        await pool.close()


def new_event(workspace_id: str, event_id: str, **properties: Any) -> NewEvent:
    return NewEvent(
        workspace_id=workspace_id,
        event_id=event_id,
        user_id="u1",
        name="page_viewed",
        occurred_at=None,
        properties=properties,
        context={},
        metadata={},
    )


def interleaved_batches(count: int, per_tx: int) -> list[list[NewEvent]]:
    """`count` events alternating two workspaces (3:1), `per_tx` per transaction."""
    events = [new_event("ws-a" if i % 4 else "ws-b", f"e{i:05d}", n=i) for i in range(count)]
    return [events[i : i + per_tx] for i in range(0, count, per_tx)]


# --- relaying ---------------------------------------------------------------------------------


async def test_every_event_is_published_once_per_workspace_subject_in_commit_order(
    rig: RelayRig,
) -> None:
    await rig.append(*interleaved_batches(2400, per_tx=150))
    relay = rig.relay(batch_size=1000)

    assert await rig.drain(relay) == 2400

    messages = await rig.published()
    committed = await rig.store_order()
    for message in messages:
        [workspace] = {e.workspace_id for e in message.batch.events}
        assert message.subject == rig.names.events_subject(workspace)
        assert 0 < len(message.batch.events) <= MAX_EVENTS_PER_MESSAGE
    for workspace in ("ws-a", "ws-b"):
        relayed = [k for m in messages for k in m.keys if k[0] == workspace]
        assert relayed == [k for k in committed if k[0] == workspace]
    assert sorted(k for m in messages for k in m.keys) == sorted(committed)
    assert len({m.msg_id for m in messages}) == len(messages)
    assert relay.published_events == 2400
    checkpoint = await rig.checkpoint()
    last = await rig.pool.fetchrow(
        "SELECT tx_id::text AS tx, global_position FROM events"
        " ORDER BY tx_id DESC, global_position DESC LIMIT 1"
    )
    assert last is not None
    assert (checkpoint["tx"], checkpoint["global_position"]) == (
        last["tx"],
        last["global_position"],
    )
    assert checkpoint["ptx"] is None
    assert checkpoint["pending_position"] is None


async def test_relayed_events_carry_their_store_fields(rig: RelayRig) -> None:
    await rig.append([new_event("ws-a", "only", total=42.5, tags=["x"])])

    await rig.drain(rig.relay())

    [message] = await rig.published()
    [relayed] = message.batch.events
    row = await rig.pool.fetchrow(
        "SELECT tx_id::text AS tx, global_position, received_at FROM events"
    )
    assert row is not None
    assert (relayed.tx_id, relayed.global_position) == (int(row["tx"]), row["global_position"])
    assert (relayed.workspace_id, relayed.event_id, relayed.user_id, relayed.name) == (
        "ws-a",
        "only",
        "u1",
        "page_viewed",
    )
    assert relayed.received_at.ToDatetime(tzinfo=UTC) == row["received_at"]
    assert dict(relayed.properties) == {"total": 42.5, "tags": ["x"]}
    expected_id = (
        f"ev:ws-a:{row['tx']}.{row['global_position']}-{row['tx']}.{row['global_position']}"
    )
    assert message.msg_id == expected_id


async def test_a_running_relay_publishes_new_commits_and_nothing_twice(rig: RelayRig) -> None:
    rig.start(rig.relay())
    await rig.append([new_event("ws-a", "first")])
    await wait_for_messages(rig, 1)
    await rig.append([new_event("ws-a", "second")], [new_event("ws-b", "third")])
    await wait_for_messages(rig, 3)

    keys = [k for m in await rig.published() for k in m.keys]
    assert keys == [("ws-a", "first"), ("ws-a", "second"), ("ws-b", "third")]


async def wait_for_messages(rig: RelayRig, count: int, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await rig.message_count() < count:
        assert asyncio.get_running_loop().time() < deadline, "relay did not publish in time"
        await asyncio.sleep(0.05)


async def wait_until_caught_up(rig: RelayRig, timeout_s: float = 10.0) -> None:
    """Until the checkpoint is at the last event with nothing pending (it commits after the
    messages are acked, so seeing the messages is not enough before stopping a relay)."""
    last = await rig.pool.fetchrow(
        "SELECT tx_id::text AS tx, global_position FROM events"
        " ORDER BY tx_id DESC, global_position DESC LIMIT 1"
    )
    assert last is not None
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        checkpoint = await rig.checkpoint()
        at_end = (checkpoint["tx"], checkpoint["global_position"]) == tuple(last.values())
        if at_end and checkpoint["ptx"] is None:
            return
        assert asyncio.get_running_loop().time() < deadline, "relay checkpoint did not catch up"
        await asyncio.sleep(0.02)


# --- crash between publish and checkpoint -----------------------------------------------------


async def test_after_a_crash_before_the_checkpoint_the_range_is_republished_as_duplicates(
    rig: RelayRig,
) -> None:
    await rig.append(*interleaved_batches(1200, per_tx=200))
    crashing = CrashAfterPublishJetStream(rig.js)

    with pytest.raises(SimulatedCrashError):
        await rig.relay(crashing, batch_size=2000).publish_once()
    while crashing.in_flight:
        await asyncio.sleep(0.01)

    before = await rig.message_count()
    interrupted = await rig.checkpoint()
    assert before == len(crashing.msg_ids) >= 3
    assert (interrupted["tx"], interrupted["global_position"]) == ("0", 0)
    assert interrupted["ptx"] is not None
    await rig.append([new_event("ws-b", "after-crash")])

    recording = RecordingJetStream(rig.js)
    rig.start(rig.relay(recording, batch_size=500))  # smaller reads must rebuild the same range
    await wait_for_messages(rig, before + 1)
    await wait_until_caught_up(rig)
    await rig.stop_all()

    republished = recording.msg_ids[: len(crashing.msg_ids)]
    assert sorted(republished) == sorted(crashing.msg_ids)
    assert all(ack.duplicate for ack in recording.acks[: len(crashing.msg_ids)])
    assert await rig.message_count() == before + 1
    keys = [k for m in await rig.published() for k in m.keys]
    assert sorted(keys) == sorted(await rig.store_order())  # every event exactly once
    assert keys[-1] == ("ws-b", "after-crash")
    recovered = await rig.checkpoint()
    assert recovered["ptx"] is None
    assert int(recovered["tx"]) > int(interrupted["ptx"])


async def test_a_pending_range_left_in_the_checkpoint_is_finished_before_new_events(
    rig: RelayRig,
) -> None:
    await rig.append([new_event("ws-a", "e1")], [new_event("ws-a", "e2")])
    await rig.drain(rig.relay())
    await rig.append([new_event("ws-a", "e3")], [new_event("ws-a", "e4")])
    events = (await eventstore.read_batch(rig.pool, Cursor.start(), 10)).events
    # As a crash would leave it: e3..e4 recorded as pending, published, checkpoint not moved.
    await rig.pool.execute(
        "UPDATE reader_checkpoints SET pending_tx_id = $2::text::xid8, pending_position = $3"
        " WHERE reader = $1",
        READER,
        str(events[3].tx_id),
        events[3].global_position,
    )
    [(_, msg_id, payload)] = list(chunk_messages(events[2:4]))
    await rig.js.publish(
        rig.names.events_subject("ws-a"), payload, headers=bus.trace_headers(msg_id)
    )
    await rig.append([new_event("ws-a", "e5")])  # would join e3..e4 in a fresh read
    assert await rig.message_count() == 2

    recording = RecordingJetStream(rig.js)
    rig.start(rig.relay(recording))
    await wait_for_messages(rig, 3)
    await wait_until_caught_up(rig)
    await rig.stop_all()

    assert recording.msg_ids[0] == msg_id
    assert [bool(ack.duplicate) for ack in recording.acks] == [True, False]
    assert await rig.message_count() == 3
    keys = [k for m in await rig.published() for k in m.keys]
    assert keys == [("ws-a", f"e{i}") for i in range(1, 6)]
    checkpoint = await rig.checkpoint()
    assert checkpoint["ptx"] is None


# --- chunking ---------------------------------------------------------------------------------

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def stored(position: int, workspace_id: str = "ws-a", **properties: Any) -> StoredEvent:
    return StoredEvent(
        tx_id=1000 + position // 7,
        global_position=position,
        workspace_id=workspace_id,
        event_id=f"e{position}",
        user_id="u1",
        name="page_viewed",
        occurred_at=T0,
        received_at=T0,
        properties=properties,
        context={},
        metadata={},
    )


def test_chunking_is_deterministic_for_the_same_range() -> None:
    events = [stored(i, "ws-a" if i % 3 else "ws-b", n=i) for i in range(1, 1300)]

    assert list(chunk_messages(events)) == list(chunk_messages(list(events)))


def test_chunks_hold_at_most_500_events_of_one_workspace_in_order() -> None:
    events = [stored(i, "ws-a" if i % 3 else "ws-b") for i in range(1, 1601)]

    chunks = list(chunk_messages(events))

    sizes: dict[str, list[int]] = {}
    for workspace_id, msg_id, payload in chunks:
        batch = ingest_pb2.EventBatch.FromString(payload)
        sizes.setdefault(workspace_id, []).append(len(batch.events))
        assert {e.workspace_id for e in batch.events} == {workspace_id}
        first, last = batch.events[0], batch.events[-1]
        assert msg_id == (
            f"ev:{workspace_id}:{first.tx_id}.{first.global_position}"
            f"-{last.tx_id}.{last.global_position}"
        )
    assert sizes == {"ws-a": [500, 500, 67], "ws-b": [500, 33]}
    relayed = [
        (e.workspace_id, e.global_position)
        for _, _, payload in chunks
        for e in ingest_pb2.EventBatch.FromString(payload).events
    ]
    assert sorted(p for _, p in relayed) == list(range(1, 1601))
    for workspace_id in ("ws-a", "ws-b"):
        mine = [p for w, p in relayed if w == workspace_id]
        assert mine == sorted(mine)


@pytest.mark.parametrize("blob_bytes", [3000, 20_897, 26_140, 30_000])
def test_chunks_never_exceed_512_kib(blob_bytes: int) -> None:
    events = [stored(i, blob="x" * blob_bytes) for i in range(1, 801)]

    chunks = list(chunk_messages(events))

    sizes = [len(payload) for _, _, payload in chunks]
    assert len(chunks) > 1
    assert all(size <= MAX_BYTES_PER_MESSAGE for size in sizes)
    assert all(size > MAX_BYTES_PER_MESSAGE - 2 * (blob_bytes + 200) for size in sizes[:-1])
    counts = [len(ingest_pb2.EventBatch.FromString(p).events) for _, _, p in chunks]
    assert sum(counts) == 800
    assert max(counts) < MAX_EVENTS_PER_MESSAGE
