"""The store relay: publishes committed events to JetStream in commit order, in batches.

Exactly one relay is active (a session advisory lock). Before publishing a range it records the
range as pending; after a crash the same range is published again as the same messages (same
`Nats-Msg-Id`), which JetStream drops as duplicates within its window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence

import asyncpg
from google.protobuf.struct_pb2 import Struct
from nats.js import JetStreamContext

from nudge import eventstore, metrics, telemetry
from nudge.bus import BusNames, trace_headers
from nudge.eventstore import Cursor, StoredEvent
from nudge.ingest.v1 import ingest_pb2
from nudge.logs import WORKSPACE_ATTRIBUTE
from nudge.runtime import sleep_or_wake

log = logging.getLogger("nudge.relay")

READER = "relay"
_LOCK_KEY = 0x72656C61  # "rela"
MAX_EVENTS_PER_MESSAGE = 500
MAX_BYTES_PER_MESSAGE = 512 * 1024


def _to_proto(event: StoredEvent) -> ingest_pb2.RecordedEvent:
    message = ingest_pb2.RecordedEvent(
        tx_id=event.tx_id,
        global_position=event.global_position,
        workspace_id=event.workspace_id,
        event_id=event.event_id,
        user_id=event.user_id,
        name=event.name,
    )
    message.occurred_at.FromDatetime(event.occurred_at)
    message.received_at.FromDatetime(event.received_at)
    properties = Struct()
    properties.update(event.properties)
    message.properties.CopyFrom(properties)
    return message


def chunk_messages(events: Sequence[StoredEvent]) -> Iterator[tuple[str, str, bytes]]:
    """Split a range into (workspace_id, msg_id, payload) messages, deterministically."""
    for workspace_id, msg_id, payload, _ in _chunks(events):
        yield workspace_id, msg_id, payload


def _chunks(
    events: Sequence[StoredEvent],
) -> Iterator[tuple[str, str, bytes, list[StoredEvent]]]:
    """`chunk_messages`, each with the events it carries."""
    by_workspace: dict[str, list[StoredEvent]] = {}
    for event in events:
        by_workspace.setdefault(event.workspace_id, []).append(event)
    for workspace_id, items in by_workspace.items():
        batch = ingest_pb2.EventBatch()
        carried: list[StoredEvent] = []
        size = 0  # kept as a running sum: batch.ByteSize() per event made chunking quadratic
        for event in items:
            record = _to_proto(event)
            framed = _framed_size(record)
            full = len(batch.events) >= MAX_EVENTS_PER_MESSAGE
            too_big = size + framed > MAX_BYTES_PER_MESSAGE
            if carried and (full or too_big):
                msg_id = _msg_id(workspace_id, carried[0], carried[-1])
                yield workspace_id, msg_id, batch.SerializeToString(), carried
                batch = ingest_pb2.EventBatch()
                carried = []
                size = 0
            batch.events.append(record)
            carried.append(event)
            size += framed
        if carried:
            msg_id = _msg_id(workspace_id, carried[0], carried[-1])
            yield workspace_id, msg_id, batch.SerializeToString(), carried


def _framed_size(record: ingest_pb2.RecordedEvent) -> int:
    # Inside EventBatch each event also costs its field tag (1 byte) and a varint length prefix.
    size = record.ByteSize()
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def _msg_id(workspace_id: str, first: StoredEvent, last: StoredEvent) -> str:
    start = f"{first.tx_id}.{first.global_position}"
    return f"ev:{workspace_id}:{start}-{last.tx_id}.{last.global_position}"


class Relay:
    """Publishes the store to the events stream."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        names: BusNames,
        wake: asyncio.Event,
        *,
        batch_size: int = 2000,
        idle_poll_s: float = 1.0,
    ) -> None:
        self._pool = pool
        self._js = js
        self._names = names
        self._wake = wake
        self._batch_size = batch_size
        self._idle_poll_s = idle_poll_s
        self.published_events = 0

    async def run(self, dsn: str) -> None:
        """Become the active relay, then publish forever."""
        from nudge.db import connect

        lock_conn = await connect(dsn, application_name="nudge-relay-lock")
        try:
            # A standby relay polls the lock: Postgres cannot notify it when the lock frees.
            while not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):  # noqa: ASYNC110
                await asyncio.sleep(1.0)
            listen_conn = await connect(dsn, application_name="nudge-relay-listen")
            try:
                await listen_conn.add_listener(
                    eventstore.NOTIFY_CHANNEL, lambda *_: self._wake.set()
                )
                await self._publish_forever()
            finally:
                with contextlib.suppress(Exception):
                    await listen_conn.close()
        finally:
            with contextlib.suppress(Exception):
                await lock_conn.close()

    async def _publish_forever(self) -> None:
        await self._finish_pending()
        while True:
            published = await self.publish_once()
            if published == 0:
                await sleep_or_wake(self._wake, self._idle_poll_s)

    async def _finish_pending(self) -> None:
        row = await self._pool.fetchrow(
            "SELECT tx_id::text AS tx, global_position, pending_tx_id::text AS ptx,"
            " pending_position FROM reader_checkpoints WHERE reader = $1",
            READER,
        )
        if row is None or row["ptx"] is None:
            return
        start = Cursor(int(row["tx"]), row["global_position"])
        end = Cursor(int(row["ptx"]), row["pending_position"])
        events: list[StoredEvent] = []
        cursor = start
        while cursor < end:
            result = await eventstore.read_batch(self._pool, cursor, self._batch_size)
            chunk = [e for e in result.events if e.cursor <= end]
            if not chunk:
                break
            events.extend(chunk)
            cursor = chunk[-1].cursor
        log.info("re-publishing %d events of an interrupted relay batch", len(events))
        await self._publish(events, end, result_xmin=0)

    async def publish_once(self) -> int:
        """Publish the next batch; return how many events it had."""
        cursor = await eventstore.load_checkpoint(self._pool, READER)
        result = await eventstore.read_batch(self._pool, cursor, self._batch_size)
        if not result.events:
            return 0
        end = result.events[-1].cursor
        await self._pool.execute(
            """INSERT INTO reader_checkpoints (reader, pending_tx_id, pending_position)
               VALUES ($1, $2::text::xid8, $3)
               ON CONFLICT (reader) DO UPDATE SET pending_tx_id = EXCLUDED.pending_tx_id,
                   pending_position = EXCLUDED.pending_position""",
            READER,
            str(end.tx_id),
            end.position,
        )
        await self._publish(result.events, end, result.xmin)
        return len(result.events)

    async def _publish(self, events: Sequence[StoredEvent], end: Cursor, result_xmin: int) -> None:
        await asyncio.gather(*(self._publish_one(*chunk) for chunk in _chunks(events)))
        async with self._pool.acquire() as conn, conn.transaction():
            await eventstore.save_checkpoint(conn, READER, end, result_xmin)
            await conn.execute(
                "UPDATE reader_checkpoints SET pending_tx_id = NULL, pending_position = NULL"
                " WHERE reader = $1",
                READER,
            )
        self.published_events += len(events)
        metrics.RELAY_EVENTS.inc(len(events))

    async def _publish_one(
        self, workspace_id: str, msg_id: str, payload: bytes, events: Sequence[StoredEvent]
    ) -> None:
        subject = self._names.events_subject(workspace_id)
        # Linked to the trace of every event it carries (their traceparent from ingest). The
        # events of one Track request share one traceparent: each distinct one is parsed once.
        traceparents = dict.fromkeys(e.metadata.get("traceparent") for e in events)
        causes = map(telemetry.span_context_of, traceparents)
        with telemetry.producer_span(
            subject,
            msg_id,
            causes=causes,
            attributes={"nudge.events": len(events), WORKSPACE_ATTRIBUTE: workspace_id},
        ):
            await self._js.publish(subject, payload, headers=trace_headers(msg_id))
