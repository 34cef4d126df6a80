"""The gap-free reader against real Postgres interleavings (RELIABILITY.md P1, T-U1..T-U3).

Each interleaving drives raw connections with explicit transactions, so the order of xid
assignment, identity assignment and commit is exactly the one the scenario names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
import pytest

from nudge import db, eventstore
from nudge.eventstore import Cursor, NewEvent, StoredEvent

WORKSPACE = "acme"


def new_event(event_id: str, *, workspace_id: str = WORKSPACE, user_id: str = "u1") -> NewEvent:
    return NewEvent(
        workspace_id=workspace_id,
        event_id=event_id,
        user_id=user_id,
        name="page_viewed",
        occurred_at=None,
        properties={"path": f"/{event_id}"},
        context={},
        metadata={},
    )


@dataclass
class Connections:
    """Raw connections for the writers of a scenario and one for the reader."""

    url: str
    opened: list[asyncpg.Connection]

    async def open(self) -> asyncpg.Connection:
        conn = await db.connect(self.url, application_name="test-gap-free-reader")
        self.opened.append(conn)
        return conn


@pytest.fixture
async def connections(database_url: str) -> AsyncIterator[Connections]:
    opened = Connections(database_url, [])
    try:
        yield opened
    finally:
        for conn in opened.opened:
            await conn.close()


async def begin(conn: asyncpg.Connection) -> None:
    await conn.execute("BEGIN")


async def commit(conn: asyncpg.Connection) -> None:
    await conn.execute("COMMIT")


async def rollback(conn: asyncpg.Connection) -> None:
    await conn.execute("ROLLBACK")


async def append_one(conn: asyncpg.Connection, event_id: str) -> int:
    """Append one event in the connection's open transaction; return its global position."""
    inserted = await eventstore.append(conn, [new_event(event_id)])
    assert inserted == {(WORKSPACE, event_id)}
    position = await conn.fetchval(
        "SELECT global_position FROM events WHERE workspace_id = $1 AND event_id = $2",
        WORKSPACE,
        event_id,
    )
    assert isinstance(position, int)
    return position


async def current_xid(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_current_xact_id()::text"))


def ids(events: Sequence[StoredEvent]) -> list[str]:
    return [e.event_id for e in events]


class GapFreeReader:
    """A consumer of `eventstore.read_batch` that keeps its composite cursor."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.cursor = Cursor.start()
        self.seen: list[StoredEvent] = []

    async def poll(self) -> list[StoredEvent]:
        result = await eventstore.read_batch(self._conn, self.cursor, 100)
        if result.events:
            self.cursor = result.events[-1].cursor
        self.seen.extend(result.events)
        return result.events


class PositionOnlyReader:
    """A deliberately naive reader: xmin-fenced, but ordered and checkpointed by position alone.

    It exists to prove that the T-U2 interleaving really is the one that breaks such readers,
    so the test of the real reader is known to bite.
    """

    def __init__(self, conn: asyncpg.Connection, *, fenced: bool = True) -> None:
        self._conn = conn
        self._fenced = fenced
        self.position = 0
        self.seen: list[str] = []

    async def poll(self) -> list[str]:
        fence = "AND tx_id < pg_snapshot_xmin(pg_current_snapshot())" if self._fenced else ""
        rows = await self._conn.fetch(
            f"""SELECT global_position, event_id FROM events
                WHERE global_position > $1 {fence}
                ORDER BY global_position LIMIT 100""",
            self.position,
        )
        if rows:
            self.position = rows[-1]["global_position"]
        found = [r["event_id"] for r in rows]
        self.seen.extend(found)
        return found


# --- T-U1: the classic gap --------------------------------------------------------------------


async def test_reader_waits_behind_an_uncommitted_earlier_writer_then_sees_both_in_order(
    connections: Connections,
) -> None:
    a, b, reader_conn = [await connections.open() for _ in range(3)]
    reader = GapFreeReader(reader_conn)

    await begin(a)
    position_a = await append_one(a, "from-a")
    await begin(b)
    position_b = await append_one(b, "from-b")
    await commit(b)
    assert position_b == position_a + 1

    assert await reader.poll() == []  # B is committed, but A's earlier gap is unsettled
    assert reader.cursor == Cursor.start()

    await commit(a)
    events = await reader.poll()

    assert ids(events) == ["from-a", "from-b"]
    assert [e.global_position for e in events] == [position_a, position_b]
    assert [e.cursor for e in events] == sorted(e.cursor for e in events)
    assert await reader.poll() == []


async def test_an_unfenced_position_reader_loses_the_classic_gap_event(
    connections: Connections,
) -> None:
    a, b, reader_conn = [await connections.open() for _ in range(3)]
    naive = PositionOnlyReader(reader_conn, fenced=False)

    await begin(a)
    await append_one(a, "from-a")
    await append_one(b, "from-b")  # autocommit: B commits first with the later position
    assert await naive.poll() == ["from-b"]
    await commit(a)

    assert await naive.poll() == []
    assert "from-a" not in naive.seen  # the permanent hole the real reader must not have


# --- T-U2: xid before position ----------------------------------------------------------------


async def interleave_xid_before_position(
    f: asyncpg.Connection, e: asyncpg.Connection
) -> tuple[int, int]:
    """F takes the smaller xid first, E inserts (earlier position), F inserts and commits; the
    reader polls; E commits. Returns E's and F's positions."""
    await begin(f)
    xid_f = await current_xid(f)
    await begin(e)
    position_e = await append_one(e, "from-e")
    assert await current_xid(e) > xid_f
    position_f = await append_one(f, "from-f")
    assert position_f > position_e
    await commit(f)
    return position_e, position_f


async def test_reader_sees_an_event_whose_xid_is_later_but_position_earlier(
    connections: Connections,
) -> None:
    f, e, reader_conn = [await connections.open() for _ in range(3)]
    reader = GapFreeReader(reader_conn)

    position_e, position_f = await interleave_xid_before_position(f, e)
    assert ids(await reader.poll()) == ["from-f"]  # F's xid is below E's, so F is settled
    await commit(e)
    later = await reader.poll()

    assert ids(later) == ["from-e"]
    assert later[0].global_position == position_e < position_f
    assert ids(reader.seen) == ["from-f", "from-e"]  # (tx_id, position) order, not position


async def test_a_position_only_reader_misses_the_event_whose_xid_is_later_but_position_earlier(
    connections: Connections,
) -> None:
    f, e, reader_conn = [await connections.open() for _ in range(3)]
    naive = PositionOnlyReader(reader_conn)

    await interleave_xid_before_position(f, e)
    assert await naive.poll() == ["from-f"]
    await commit(e)

    assert await naive.poll() == []
    assert naive.seen == ["from-f"]  # E is lost for good: this is what the real reader prevents
    count = await reader_conn.fetchval("SELECT count(*) FROM events")
    assert count == 2


# --- T-U3: a rolled-back gap ------------------------------------------------------------------


async def test_reader_passes_a_rolled_back_hole_on_its_next_poll_without_any_timeout(
    connections: Connections,
) -> None:
    a, b, reader_conn = [await connections.open() for _ in range(3)]
    reader = GapFreeReader(reader_conn)

    await begin(a)
    position_a = await append_one(a, "rolled-back")
    position_b = await append_one(b, "kept")
    assert await reader.poll() == []
    await rollback(a)

    events = await reader.poll()

    assert ids(events) == ["kept"]
    assert events[0].global_position == position_b == position_a + 1  # the hole stays a hole
    assert await reader.poll() == []


# --- watermark, checkpoints, append -----------------------------------------------------------


async def test_an_empty_read_still_reports_the_snapshot_xmin_it_read_under(
    connections: Connections,
) -> None:
    holder, reader_conn = [await connections.open() for _ in range(2)]
    await begin(holder)
    held_xid = await current_xid(holder)

    empty_store = await eventstore.read_batch(reader_conn, Cursor.start(), 10)

    assert empty_store.events == []
    assert empty_store.xmin == held_xid
    await commit(holder)

    await append_one(holder, "only")
    first = await eventstore.read_batch(reader_conn, Cursor.start(), 10)
    caught_up = await eventstore.read_batch(reader_conn, first.events[-1].cursor, 10)
    now_xmin = int(await reader_conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())"))

    assert caught_up.events == []
    assert held_xid < caught_up.xmin <= now_xmin
    assert first.events[0].tx_id < caught_up.xmin


async def test_read_batch_honours_its_limit_and_resumes_from_the_last_cursor(
    connections: Connections,
) -> None:
    (conn,) = [await connections.open()]
    async with conn.transaction():
        await eventstore.append(conn, [new_event(f"e{i}") for i in range(5)])

    first = await eventstore.read_batch(conn, Cursor.start(), 3)
    rest = await eventstore.read_batch(conn, first.events[-1].cursor, 3)

    assert ids(first.events) == ["e0", "e1", "e2"]
    assert ids(rest.events) == ["e3", "e4"]
    assert rest.events[0].properties == {"path": "/e3"}
    assert rest.events[0].occurred_at == rest.events[0].received_at  # None means "when received"


async def test_a_checkpoint_round_trips_and_its_watermark_never_moves_back(
    connections: Connections,
) -> None:
    (conn,) = [await connections.open()]
    assert await eventstore.load_checkpoint(conn, "reader-a") == Cursor.start()

    big_xid = 2**40 + 7  # an xid8 past the first epoch survives the text round trip
    async with conn.transaction():
        await eventstore.save_checkpoint(conn, "reader-a", Cursor(big_xid, 42), xmin=big_xid + 3)
    assert await eventstore.load_checkpoint(conn, "reader-a") == Cursor(big_xid, 42)
    assert await eventstore.load_checkpoint(conn, "reader-b") == Cursor.start()

    async with conn.transaction():
        await eventstore.save_checkpoint(conn, "reader-a", Cursor(big_xid + 1, 43), xmin=5)
    assert await eventstore.load_checkpoint(conn, "reader-a") == Cursor(big_xid + 1, 43)
    last_xmin = await conn.fetchval(
        "SELECT last_xmin::text FROM reader_checkpoints WHERE reader = 'reader-a'"
    )
    assert int(last_xmin) == big_xid + 3


async def test_append_inserts_only_new_keys_and_returns_just_those(
    connections: Connections,
) -> None:
    (conn,) = [await connections.open()]
    async with conn.transaction():
        first = await eventstore.append(conn, [new_event("e1"), new_event("e2")])
    async with conn.transaction():
        second = await eventstore.append(
            conn,
            [
                new_event("e1"),
                new_event("e3"),
                new_event("e3"),  # the same key twice in one call inserts once
                new_event("e1", workspace_id="other"),  # ids are unique per workspace
            ],
        )
    async with conn.transaction():
        nothing = await eventstore.append(conn, [])

    assert first == {(WORKSPACE, "e1"), (WORKSPACE, "e2")}
    assert second == {(WORKSPACE, "e3"), ("other", "e1")}
    assert nothing == set()
    rows = await conn.fetch("SELECT workspace_id, event_id FROM events ORDER BY global_position")
    assert [(r["workspace_id"], r["event_id"]) for r in rows] == [
        (WORKSPACE, "e1"),
        (WORKSPACE, "e2"),
        (WORKSPACE, "e3"),
        ("other", "e1"),
    ]
    hashes = await eventstore.existing_hashes(conn, [(WORKSPACE, "e1"), (WORKSPACE, "nope")])
    assert hashes == {(WORKSPACE, "e1"): new_event("e1").body_hash()}
