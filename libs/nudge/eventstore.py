"""The append-only event store: appends, and the gap-free reader every consumer uses.

Readers follow `(tx_id, global_position)` strictly below the reading snapshot's xmin. Identity
values are handed out before commit, so commit order differs from position order; a transaction
that got an early xid can also commit with a late position. Reading only below xmin means every
transaction that could still add rows "before" the cursor has settled (RELIABILITY.md P1), so a
checkpoint never skips an event and no timeout is ever needed.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nudge.db import Conn, Queryable

NOTIFY_CHANNEL = "nudge_events"


@dataclass(frozen=True, order=True)
class Cursor:
    """A position in commit order. `Cursor(0, 0)` is before the first event."""

    tx_id: int
    position: int

    @classmethod
    def start(cls) -> Cursor:
        """The cursor before every event."""
        return cls(0, 0)


@dataclass(frozen=True)
class StoredEvent:
    """An event as recorded in the store."""

    tx_id: int
    global_position: int
    workspace_id: str
    event_id: str
    user_id: str
    name: str
    occurred_at: datetime
    received_at: datetime
    properties: dict[str, Any]
    context: dict[str, Any]
    metadata: dict[str, Any]

    @property
    def cursor(self) -> Cursor:
        """The cursor just at this event."""
        return Cursor(self.tx_id, self.global_position)


@dataclass(frozen=True)
class NewEvent:
    """An event to append. `occurred_at` None means "when received" (the database clock)."""

    workspace_id: str
    event_id: str
    user_id: str
    name: str
    occurred_at: datetime | None
    properties: dict[str, Any]
    context: dict[str, Any]
    metadata: dict[str, Any]

    @functools.cached_property
    def _hash(self) -> bytes:
        body = [
            self.user_id,
            self.name,
            None if self.occurred_at is None else self.occurred_at.isoformat(),
            self.properties,
            self.context,
        ]
        encoded = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(encoded.encode()).digest()

    def body_hash(self) -> bytes:
        """Hash of everything but metadata: the same event_id with another body is a conflict."""
        return self._hash


@dataclass(frozen=True)
class ReadResult:
    """A batch read below the snapshot xmin, and that xmin (the reader's watermark)."""

    events: list[StoredEvent]
    xmin: int


_READ_SQL = """
WITH snap AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin),
batch AS (
    SELECT tx_id, global_position, workspace_id, event_id, user_id, name,
           occurred_at, received_at, properties, context, metadata
    FROM events
    WHERE (tx_id, global_position) > ($1::text::xid8, $2)
      AND tx_id < (SELECT xmin FROM snap)
    ORDER BY tx_id, global_position
    LIMIT $3
)
SELECT (SELECT xmin::text FROM snap) AS snapshot_xmin, b.tx_id::text AS tx_text, b.global_position,
       b.workspace_id, b.event_id, b.user_id, b.name, b.occurred_at, b.received_at,
       b.properties, b.context, b.metadata
FROM (SELECT 1) AS one LEFT JOIN batch b ON true
ORDER BY b.tx_id, b.global_position
"""


async def read_batch(conn: Queryable, after: Cursor, limit: int) -> ReadResult:
    """Read up to `limit` events after `after` in commit order, never past an unsettled one."""
    rows = await conn.fetch(_READ_SQL, str(after.tx_id), after.position, limit)
    xmin = int(rows[0]["snapshot_xmin"])
    events = [
        StoredEvent(
            tx_id=int(r["tx_text"]),
            global_position=r["global_position"],
            workspace_id=r["workspace_id"],
            event_id=r["event_id"],
            user_id=r["user_id"],
            name=r["name"],
            occurred_at=r["occurred_at"],
            received_at=r["received_at"],
            properties=r["properties"],
            context=r["context"],
            metadata=r["metadata"],
        )
        for r in rows
        if r["tx_text"] is not None
    ]
    return ReadResult(events, xmin)


async def load_checkpoint(conn: Queryable, reader: str) -> Cursor:
    """The reader's committed cursor (the start when it has none)."""
    row = await conn.fetchrow(
        "SELECT tx_id::text AS tx, global_position FROM reader_checkpoints WHERE reader = $1",
        reader,
    )
    return Cursor.start() if row is None else Cursor(int(row["tx"]), row["global_position"])


async def reader_lag(conn: Queryable, reader: str, cap: int = 100_000) -> tuple[int, float]:
    """How far a reader is behind: (committed events after its checkpoint, at most `cap`;
    seconds since the oldest of them was received, 0.0 when there is none)."""
    cursor = await load_checkpoint(conn, reader)
    row = await conn.fetchrow(
        """SELECT count(*) AS events,
                  coalesce(extract(epoch FROM (SELECT nudge_now()) - min(received_at)), 0)::float8
                      AS seconds
           FROM (SELECT received_at FROM events
                 WHERE (tx_id, global_position) > ($1::text::xid8, $2)
                 ORDER BY tx_id, global_position LIMIT $3) AS behind""",
        str(cursor.tx_id),
        cursor.position,
        cap,
    )
    assert row is not None
    return int(row["events"]), max(float(row["seconds"]), 0.0)


async def save_checkpoint(conn: Conn, reader: str, cursor: Cursor, xmin: int) -> None:
    """Store the cursor and the watermark xmin; call inside the transaction of the effect."""
    await conn.execute(
        """INSERT INTO reader_checkpoints (reader, tx_id, global_position, last_xmin, updated_at)
           VALUES ($1, $2::text::xid8, $3, $4::text::xid8, clock_timestamp())
           ON CONFLICT (reader) DO UPDATE SET
               tx_id = EXCLUDED.tx_id, global_position = EXCLUDED.global_position,
               last_xmin = GREATEST(reader_checkpoints.last_xmin, EXCLUDED.last_xmin),
               updated_at = EXCLUDED.updated_at""",
        reader,
        str(cursor.tx_id),
        cursor.position,
        str(xmin),
    )


_APPEND_SQL = """
INSERT INTO events (workspace_id, event_id, user_id, name, occurred_at, received_at,
                    properties, context, metadata, body_hash)
SELECT w, i, u, n, COALESCE(o, t.now), t.now, p, c, m, h
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
            $6::jsonb[], $7::jsonb[], $8::jsonb[], $9::bytea[]) AS x(w, i, u, n, o, p, c, m, h),
     (SELECT nudge_now() AS now) t
ON CONFLICT (workspace_id, event_id) DO NOTHING
RETURNING workspace_id, event_id
"""


async def append(conn: Conn, events: Sequence[NewEvent]) -> set[tuple[str, str]]:
    """Insert events that are new; return the (workspace_id, event_id) pairs inserted.

    Call inside a transaction; the caller decides what a conflict means (duplicate or error) with
    `existing_hashes`. Sends a NOTIFY so the relay wakes at commit.
    """
    if not events:
        return set()
    # Take the transaction id BEFORE stamping received_at: then every event received at or
    # before T belongs to a transaction whose xid was assigned before T, so a timer that fires
    # at T with snapshot s and waits for the projection to pass pg_snapshot_xmax(s) sees it
    # (RELIABILITY.md P4), with no safety margin on the fire time. The NOTIFY is delivered at
    # commit wherever it stands in the transaction, so it shares this round trip.
    await conn.execute(f"SELECT pg_current_xact_id(); NOTIFY {NOTIFY_CHANNEL}")
    rows = await conn.fetch(
        _APPEND_SQL,
        [e.workspace_id for e in events],
        [e.event_id for e in events],
        [e.user_id for e in events],
        [e.name for e in events],
        [e.occurred_at for e in events],
        [e.properties for e in events],
        [e.context for e in events],
        [e.metadata for e in events],
        [e.body_hash() for e in events],
    )
    return {(r["workspace_id"], r["event_id"]) for r in rows}


async def existing_hashes(
    conn: Queryable, keys: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], bytes]:
    """Body hashes of already stored events, by (workspace_id, event_id)."""
    pairs = list(keys)
    if not pairs:
        return {}
    rows = await conn.fetch(
        """SELECT e.workspace_id, e.event_id, e.body_hash
           FROM unnest($1::text[], $2::text[]) AS k(w, i)
           JOIN events e ON e.workspace_id = k.w AND e.event_id = k.i""",
        [w for w, _ in pairs],
        [i for _, i in pairs],
    )
    return {(r["workspace_id"], r["event_id"]): bytes(r["body_hash"]) for r in rows}
