"""All SQL of dispatch: the sends state machine, dead letters, outcome events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from nudge import eventstore
from nudge.db import Conn, Queryable
from nudge.eventstore import NewEvent

_COLUMNS = (
    "send_id::text AS send_id, workspace_id, user_id, campaign_id, campaign_version, channel,"
    " state, attempts, reason, request, created_at"
)


@dataclass(frozen=True)
class SendRow:
    """A claimed (or inspected) send."""

    send_id: str
    workspace_id: str
    user_id: str
    campaign_id: str
    campaign_version: int
    channel: str
    state: str
    attempts: int
    reason: str
    request: bytes
    created_at: datetime

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> SendRow:
        """Build from a row selected with the standard columns."""
        values: dict[str, Any] = dict(record.items())
        values["request"] = bytes(values["request"])
        return cls(**values)


async def insert_planned(
    conn: Queryable,
    *,
    send_id: str,
    workspace_id: str,
    user_id: str,
    campaign_id: str,
    campaign_version: int,
    channel: str,
    request: bytes,
) -> bool:
    """Record a send as planned; False when it was already known (a redelivery)."""
    status = await conn.execute(
        """INSERT INTO sends (send_id, workspace_id, user_id, campaign_id, campaign_version,
                              channel, state, request)
           VALUES ($1::uuid, $2, $3, $4, $5, $6, 'planned', $7)
           ON CONFLICT (send_id) DO NOTHING""",
        send_id,
        workspace_id,
        user_id,
        campaign_id,
        campaign_version,
        channel,
        request,
    )
    return bool(status.endswith(" 1"))


async def claim(conn: Queryable, send_id: str, lease: timedelta) -> SendRow | None:
    """Move a planned or due retry_wait send to attempting under a lease; None if not claimable."""
    row = await conn.fetchrow(
        f"""UPDATE sends SET state = 'attempting', attempts = attempts + 1,
                   lease_until = nudge_now() + $2::interval, updated_at = nudge_now()
            WHERE send_id = $1::uuid
              AND (state = 'planned' OR (state = 'retry_wait' AND next_at <= nudge_now()))
            RETURNING {_COLUMNS}""",
        send_id,
        lease,
    )
    return None if row is None else SendRow.from_record(row)


async def claim_stale_attempt(conn: Queryable, send_id: str, lease: timedelta) -> SendRow | None:
    """Take over a send whose attempt outlived its lease (its worker died mid-attempt)."""
    row = await conn.fetchrow(
        f"""UPDATE sends SET attempts = attempts + 1,
                   lease_until = nudge_now() + $2::interval, updated_at = nudge_now()
            WHERE send_id = $1::uuid AND state = 'attempting' AND lease_until < nudge_now()
            RETURNING {_COLUMNS}""",
        send_id,
        lease,
    )
    return None if row is None else SendRow.from_record(row)


async def due_send_ids(conn: Queryable, limit: int) -> list[str]:
    """Sends due for a retry and attempts whose lease expired, oldest first."""
    rows = await conn.fetch(
        """(SELECT send_id::text, next_at AS t FROM sends
             WHERE state = 'retry_wait' AND next_at <= nudge_now() ORDER BY next_at LIMIT $1)
           UNION ALL
           (SELECT send_id::text, lease_until AS t FROM sends
             WHERE state = 'attempting' AND lease_until < nudge_now()
             ORDER BY lease_until LIMIT $1)
           ORDER BY t LIMIT $1""",
        limit,
    )
    return [r["send_id"] for r in rows]


async def state_of(conn: Queryable, send_id: str) -> str | None:
    """The current state of a send, or None if unknown."""
    value = await conn.fetchval("SELECT state FROM sends WHERE send_id = $1::uuid", send_id)
    return None if value is None else str(value)


def _outcome_event(send: SendRow, outcome: str, properties: dict[str, Any]) -> NewEvent:
    return NewEvent(
        workspace_id=send.workspace_id,
        event_id=f"{send.send_id}:{outcome}",
        user_id=send.user_id,
        name=f"message.{outcome}",
        occurred_at=None,
        properties={
            "send_id": send.send_id,
            "campaign_id": send.campaign_id,
            "campaign_version": send.campaign_version,
            "channel": send.channel,
            **properties,
        },
        context={},
        metadata={},
    )


async def _finish(
    conn: Conn,
    send: SendRow,
    state: str,
    reason: str,
    *,
    provider_message_id: str | None = None,
    event: str | None = None,
) -> None:
    await conn.execute(
        """UPDATE sends SET state = $2, reason = $3, lease_until = NULL, next_at = NULL,
               provider_message_id = COALESCE($4, provider_message_id),
               sent_at = CASE WHEN $2 = 'sent' THEN nudge_now() ELSE sent_at END,
               updated_at = nudge_now()
           WHERE send_id = $1::uuid""",
        send.send_id,
        state,
        reason,
        provider_message_id,
    )
    if event is not None:
        properties: dict[str, Any] = {"reason": reason} if reason else {}
        await eventstore.append(conn, [_outcome_event(send, event, properties)])


async def mark_sent(conn: Conn, send: SendRow, provider_message_id: str | None) -> None:
    """Record delivery and append `message.sent`."""
    await _finish(conn, send, "sent", "", provider_message_id=provider_message_id, event="sent")


async def mark_dead(conn: Conn, send: SendRow, reason: str) -> None:
    """Record a permanent failure, dead-letter it and append `message.failed`."""
    await _finish(conn, send, "dead", reason, event="failed")
    await conn.execute(
        "INSERT INTO dead_letters (send_id, workspace_id, reason, attempts)"
        " VALUES ($1::uuid, $2, $3, $4)",
        send.send_id,
        send.workspace_id,
        reason,
        send.attempts,
    )


async def mark_suppressed(conn: Conn, send: SendRow, reason: str) -> None:
    """Record a deliberate non-send and append `message.suppressed`."""
    await _finish(conn, send, "suppressed", reason, event="suppressed")


async def mark_ambiguous(conn: Conn, send: SendRow, reason: str) -> None:
    """Park a send that may or may not have reached the provider (never retried)."""
    await _finish(conn, send, "ambiguous", reason)


async def mark_retry(conn: Queryable, send: SendRow, next_at: datetime, reason: str) -> None:
    """Schedule the next attempt durably."""
    await conn.execute(
        """UPDATE sends SET state = 'retry_wait', next_at = $2, reason = $3, lease_until = NULL,
               updated_at = nudge_now()
           WHERE send_id = $1::uuid""",
        send.send_id,
        next_at,
        reason,
    )


async def list_messages(conn: Queryable, workspace_id: str, user_id: str, limit: int) -> list[Any]:
    """A user's sends, newest first."""
    return await conn.fetch(
        """SELECT send_id::text AS send_id, campaign_id, channel, state, reason, attempts,
                  created_at, sent_at
           FROM sends WHERE workspace_id = $1 AND user_id = $2
           ORDER BY created_at DESC, send_id LIMIT $3""",
        workspace_id,
        user_id,
        limit,
    )
