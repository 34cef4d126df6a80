"""All SQL of the scheduler: the `timers` table and its NOTIFY channels."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from nudge.db import Conn, Queryable
from services.scheduler.domain import Timer, TimerRequest, TimerState

TIMERS_CHANNEL = "nudge_timers"
"""NOTIFYed when a timer is (re-)armed, so firing loops recompute their sleep."""
CLOCK_CHANNEL = "nudge_clock"
"""NOTIFYed by the dev clock tool after it moves `dev_clock.skew`."""

_COLUMNS = "timer_id, workspace_id, topic, due_at, payload, traceparent, state, version"


@dataclass(frozen=True)
class FiringSnapshot:
    """The database time and snapshot of a firing transaction."""

    fired_at: datetime
    xmax: int


def _timer(record: asyncpg.Record) -> Timer:
    return Timer(
        timer_id=uuid.UUID(int=record["timer_id"].int),
        workspace_id=record["workspace_id"],
        topic=record["topic"],
        due_at=record["due_at"],
        payload=bytes(record["payload"]),
        traceparent=record["traceparent"],
        state=TimerState(record["state"]),
        version=record["version"],
    )


async def schedule(conn: Conn, request: TimerRequest) -> Timer:
    """Arm a timer, or re-arm it with a new version; return it as stored.

    Idempotent: when the timer is already pending with the same workspace, topic, due time and
    payload, the row is left untouched (same version, no NOTIFY), so a retried call is a no-op.
    """
    async with conn.transaction():
        # ON CONFLICT ... WHERE locks the existing row even when it is left unchanged, so the
        # follow-up SELECT reads exactly the row the WHERE clause judged.
        record = await conn.fetchrow(
            f"""INSERT INTO timers AS t
                       (timer_id, workspace_id, topic, due_at, state, payload, traceparent)
                VALUES ($1, $2, $3, $4, 'pending', $5, $6)
                ON CONFLICT (timer_id) DO UPDATE
                   SET workspace_id = EXCLUDED.workspace_id, topic = EXCLUDED.topic,
                       due_at = EXCLUDED.due_at, payload = EXCLUDED.payload,
                       traceparent = EXCLUDED.traceparent, state = 'pending',
                       version = t.version + 1, updated_at = nudge_now(), fired_at = NULL
                 WHERE NOT (t.state = 'pending'
                            AND t.workspace_id = EXCLUDED.workspace_id
                            AND t.topic = EXCLUDED.topic
                            AND t.due_at = EXCLUDED.due_at
                            AND t.payload = EXCLUDED.payload)
                RETURNING {_COLUMNS}""",
            request.timer_id,
            request.workspace_id,
            request.topic,
            request.due_at,
            request.payload,
            request.traceparent,
        )
        if record is None:
            record = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM timers WHERE timer_id = $1", request.timer_id
            )
            assert record is not None
        else:
            # Delivered at commit: sleeping firing loops wake and recompute the next due time.
            await conn.execute("SELECT pg_notify($1, '')", TIMERS_CHANNEL)
        return _timer(record)


async def cancel(conn: Conn, timer_id: uuid.UUID) -> TimerState | None:
    """Cancel a pending timer; return its state afterwards (None when unknown)."""
    # Two statements, not one: if the firing loop holds the row, the UPDATE waits for it and
    # finds it fired; only a new statement's snapshot then reports 'fired' instead of 'pending'.
    state = await conn.fetchval(
        """UPDATE timers SET state = 'cancelled', updated_at = nudge_now()
           WHERE timer_id = $1 AND state = 'pending'
           RETURNING state""",
        timer_id,
    )
    if state is None:
        state = await conn.fetchval("SELECT state FROM timers WHERE timer_id = $1", timer_id)
    return None if state is None else TimerState(state)


async def get(conn: Queryable, timer_id: uuid.UUID) -> Timer | None:
    """The stored timer, or None."""
    record = await conn.fetchrow(f"SELECT {_COLUMNS} FROM timers WHERE timer_id = $1", timer_id)
    return None if record is None else _timer(record)


async def claim_due(conn: Conn, limit: int) -> list[Timer]:
    """Lock up to `limit` due pending timers, earliest first. Call inside a transaction.

    `due_at <= nudge_now()` by the database clock, so nothing fires early. SKIP LOCKED lets
    concurrent firing loops take disjoint batches instead of queueing behind each other; a row
    another loop fired (and committed) meanwhile is re-checked against `state = 'pending'` and
    dropped, so no timer is fired twice.
    """
    records = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM timers
            WHERE state = 'pending' AND due_at <= (SELECT nudge_now())
            ORDER BY due_at, timer_id
            LIMIT $1
            FOR UPDATE SKIP LOCKED""",
        limit,
    )
    return [_timer(record) for record in records]


async def firing_snapshot(conn: Conn) -> FiringSnapshot:
    """The firing time and `pg_snapshot_xmax` of the current transaction."""
    record = await conn.fetchrow(
        "SELECT nudge_now() AS fired_at, pg_snapshot_xmax(pg_current_snapshot())::text AS xmax"
    )
    assert record is not None
    return FiringSnapshot(fired_at=record["fired_at"], xmax=int(record["xmax"]))


async def mark_fired(conn: Conn, timer_ids: Sequence[uuid.UUID], fired_at: datetime) -> int:
    """Record claimed timers as fired at `fired_at`; return how many rows changed."""
    status = await conn.execute(
        """UPDATE timers SET state = 'fired', fired_at = $2, updated_at = $2
           WHERE timer_id = ANY($1::uuid[]) AND state = 'pending'""",
        list(timer_ids),
        fired_at,
    )
    return int(status.rsplit(" ", 1)[1])


async def next_due_in(conn: Queryable) -> timedelta | None:
    """Time from now (database clock) to the earliest pending due time; None when none pending.

    Negative when a timer is overdue.
    """
    value = await conn.fetchval(
        "SELECT min(due_at) - nudge_now() FROM timers WHERE state = 'pending'"
    )
    assert value is None or isinstance(value, timedelta)
    return value


PENDING_COUNT_CAP = 100_000
"""Most timers `pending_counts` counts: a count equal to it means "at least this many"."""


async def pending_counts(conn: Queryable, cap: int = PENDING_COUNT_CAP) -> tuple[int, int]:
    """(pending timers, pending timers already due) for the metrics, each at most `cap`.

    The metrics sampler calls this every few seconds, so it reads only the `cap` earliest-due
    pending timers (a bounded range of the `timers_due` index), not all of them: a count equal
    to `cap` means "at least `cap`". Overdue timers are the earliest due, so each count is exact
    while below `cap`.
    """
    row = await conn.fetchrow(
        """SELECT count(*) AS pending,
                  count(*) FILTER (WHERE due_at <= (SELECT nudge_now())) AS overdue
           FROM (SELECT due_at FROM timers WHERE state = 'pending'
                 ORDER BY due_at LIMIT $1) AS earliest""",
        cap,
    )
    assert row is not None
    return int(row["pending"]), int(row["overdue"])
