"""All SQL of dispatch: the sends state machine, claims under the per-user lock, workspace
policies, the inline recipient projection, dead letters and outcome events.

State machine (RELIABILITY.md P3; docs/dispatch.md):

    planned ──claim──▶ claimed ──mark_attempting──▶ attempting ──▶ sent | retry_wait | dead
       │  ▲               │                             │                  | ambiguous
       │  └─held──────────┘ (quiet hours)               └─ lease expired ─▶ ambiguous | retry_wait
       └──────────▶ suppressed (consent, cap, undeliverable)

Every write after a claim is fenced by `claim_no`: a worker that lost its lease (and whose
send was claimed again elsewhere) cannot record an outcome over the new owner's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from nudge import eventstore
from nudge.db import Conn, Queryable
from nudge.eventstore import NewEvent
from services.dispatch.policy import Recipient

USER_LOCK_CLASS = 0x6E647370  # "ndsp": the two-key advisory lock space of dispatch's user locks

_BASE_COLUMNS = (
    "send_id::text AS send_id, workspace_id, user_id, campaign_id, campaign_version, channel,"
    " state, attempts, reason, created_at, kind, priority,"
    " COALESCE(decided_at, created_at) AS decided_at, claim_no,"
    " cap_reserved_at IS NOT NULL AS holds_cap_slot, replays, window_started_at, next_at,"
    " experiment_group"
)
_COLUMNS = _BASE_COLUMNS + ", request"


@dataclass(frozen=True)
class SendRow:
    """A send as stored (claimed, or inspected). `request` (the encoded SendRequest) is None
    where it was not selected: `tracked_send`, whose events need none of it."""

    send_id: str
    workspace_id: str
    user_id: str
    campaign_id: str
    campaign_version: int
    channel: str
    state: str
    attempts: int
    reason: str
    request: bytes | None
    created_at: datetime
    kind: str
    priority: int
    decided_at: datetime
    claim_no: int
    holds_cap_slot: bool
    replays: int
    window_started_at: datetime
    next_at: datetime | None
    experiment_group: str

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> SendRow:
        """Build from a row selected with the standard columns, `request` optional (others
        are ignored)."""
        values: dict[str, Any] = {k: v for k, v in record.items() if k in _SEND_FIELDS}
        request = values.get("request")
        values["request"] = None if request is None else bytes(request)
        return cls(**values)


_SEND_FIELDS = frozenset(SendRow.__dataclass_fields__)


# --------------------------------------------------------------------------------------------
# recording and finding work


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
    kind: str = "marketing",
    priority: int = 0,
    decided_at: datetime | None = None,
    pickup_grace: timedelta = timedelta(seconds=5),
    traceparent: str = "",
    experiment_group: str = "",
) -> bool:
    """Record a send as planned; False when it was already known (a redelivery).

    `lease_until` is the pickup deadline: the recording worker claims it at once; if it cannot
    (it crashed, or its channel lane is full) the sweeper of any replica picks it up then.
    """
    status = await conn.execute(
        """INSERT INTO sends (send_id, workspace_id, user_id, campaign_id, campaign_version,
                              channel, state, request, kind, priority, decided_at, lease_until,
                              traceparent, experiment_group)
           VALUES ($1::uuid, $2, $3, $4, $5, $6, 'planned', $7, $8, $9,
                   COALESCE($10, nudge_now()), nudge_now() + $11::interval, $12, $13)
           ON CONFLICT (send_id) DO NOTHING""",
        send_id,
        workspace_id,
        user_id,
        campaign_id,
        campaign_version,
        channel,
        request,
        kind,
        priority,
        decided_at,
        pickup_grace,
        traceparent,
        experiment_group,
    )
    return bool(status.endswith(" 1"))


async def due_sends(
    conn: Queryable, limit: int, skip_channels: Sequence[str] = ()
) -> list[tuple[str, str, str]]:
    """(send_id, channel, traceparent) of sends to claim now: held or retrying sends that are
    due, planned sends past their pickup deadline and claims whose worker died; oldest first."""
    rows = await conn.fetch(
        """WITH now AS MATERIALIZED (SELECT nudge_now() AS t)
           (SELECT send_id::text, channel, traceparent, next_at AS due FROM sends
             WHERE state IN ('planned', 'retry_wait') AND next_at <= (SELECT t FROM now)
               AND channel <> ALL($2::text[])
             ORDER BY next_at LIMIT $1)
           UNION ALL
           (SELECT send_id::text, channel, traceparent, lease_until AS due FROM sends
             WHERE state IN ('planned', 'claimed') AND lease_until < (SELECT t FROM now)
               AND next_at IS NULL AND channel <> ALL($2::text[])
             ORDER BY lease_until LIMIT $1)
           ORDER BY due LIMIT $1""",
        limit,
        list(skip_channels),
    )
    return [(r["send_id"], r["channel"], r["traceparent"]) for r in rows]


async def stale_attempts(conn: Queryable, limit: int) -> list[SendRow]:
    """Attempts whose worker died or hung past its lease: their provider outcome is unknown."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM sends
            WHERE state = 'attempting' AND lease_until < (SELECT nudge_now())
            ORDER BY lease_until LIMIT $1""",
        limit,
    )
    return [SendRow.from_record(r) for r in rows]


async def open_send_owner(conn: Queryable, send_id: str) -> tuple[str, str] | None:
    """(workspace_id, user_id) of a send that may be claimable now; None when it is not (a
    redelivery of a send that is finished, held, or in another worker's hands)."""
    row = await conn.fetchrow(
        """SELECT workspace_id, user_id FROM sends
           WHERE send_id = $1::uuid AND (
                 (state = 'planned' AND (next_at IS NULL OR next_at <= (SELECT nudge_now())))
              OR (state = 'retry_wait' AND next_at <= (SELECT nudge_now()))
              OR (state = 'claimed' AND lease_until < (SELECT nudge_now())))""",
        send_id,
    )
    return None if row is None else (row["workspace_id"], row["user_id"])


# --------------------------------------------------------------------------------------------
# the claim transaction (all of these run inside it, after `lock_user`)


async def lock_user(conn: Conn, workspace_id: str, user_id: str) -> datetime:
    """Take the user's claim lock for the rest of the transaction; return the database time.

    Every claim of the user's sends runs under this lock, so caps and consent are checked and
    slots reserved by one claimer at a time (RELIABILITY.md P3, P10); SERIALIZABLE alone is not
    relied on. The two-key form keeps it apart from the single-key locks other services use.
    """
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2 || '/' || $3))",
        USER_LOCK_CLASS,
        workspace_id,
        user_id,
    )
    now = await conn.fetchval("SELECT nudge_now()")
    assert isinstance(now, datetime)
    return now


async def contenders(
    conn: Conn, workspace_id: str, user_id: str, now: datetime, limit: int
) -> list[SendRow]:
    """The user's sends due now, in competition order (priority, decided_at, send_id)."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM sends
            WHERE workspace_id = $1 AND user_id = $2 AND (
                  (state = 'planned' AND (next_at IS NULL OR next_at <= $3))
               OR (state = 'retry_wait' AND next_at <= $3)
               OR (state = 'claimed' AND lease_until < $3))
            ORDER BY priority DESC, COALESCE(decided_at, created_at), send_id
            LIMIT $4""",
        workspace_id,
        user_id,
        now,
        limit,
    )
    return [SendRow.from_record(r) for r in rows]


async def cap_reservations(
    conn: Conn, workspace_id: str, user_id: str, since: datetime
) -> list[tuple[str, datetime]]:
    """(channel, reserved_at) of the cap slots the user's sends hold since `since`."""
    rows = await conn.fetch(
        """SELECT channel, cap_reserved_at FROM sends
           WHERE workspace_id = $1 AND user_id = $2 AND cap_reserved_at >= $3""",
        workspace_id,
        user_id,
        since,
    )
    return [(r["channel"], r["cap_reserved_at"]) for r in rows]


async def recipient(conn: Queryable, workspace_id: str, user_id: str) -> Recipient:
    """The user's consent facts as of now, from the inline projection (never set: all None)."""
    row = await conn.fetchrow(
        """SELECT email_subscribe, push_subscribe, sms_subscribe, timezone
           FROM recipient_preferences WHERE workspace_id = $1 AND user_id = $2""",
        workspace_id,
        user_id,
    )
    blocked = await conn.fetch(
        """SELECT channel, address FROM undeliverable_addresses
           WHERE workspace_id = $1 AND user_id = $2""",
        workspace_id,
        user_id,
    )
    undeliverable: dict[str, set[str]] = {}
    for item in blocked:
        undeliverable.setdefault(item["channel"], set()).add(item["address"])
    subscriptions: dict[str, str | None] = {}
    if row is not None:
        for channel in ("email", "push", "sms"):
            subscriptions[channel] = row[f"{channel}_subscribe"]
    return Recipient(
        subscriptions,
        None if row is None else row["timezone"],
        {channel: frozenset(addresses) for channel, addresses in undeliverable.items()},
    )


async def mark_claimed(
    conn: Conn, send: SendRow, lease: timedelta, *, reserve_cap: bool, now: datetime
) -> SendRow | None:
    """Take the send for one attempt (claim_no bumps); reserve its cap slot if asked."""
    row = await conn.fetchrow(
        f"""UPDATE sends SET state = 'claimed', claim_no = claim_no + 1,
                   lease_until = $2::timestamptz + $3::interval, next_at = NULL, reason = '',
                   cap_reserved_at = CASE WHEN $4 AND cap_reserved_at IS NULL THEN $2::timestamptz
                                          ELSE cap_reserved_at END,
                   updated_at = $2::timestamptz
            WHERE send_id = $1::uuid AND state = $5 AND claim_no = $6
            RETURNING {_COLUMNS}""",
        send.send_id,
        now,
        lease,
        reserve_cap,
        send.state,
        send.claim_no,
    )
    return None if row is None else SendRow.from_record(row)


async def mark_held(conn: Conn, send: SendRow, until: datetime, reason: str) -> None:
    """Hold a send (quiet hours): due again at `until`, in the state it waited in before."""
    await conn.execute(
        """UPDATE sends SET state = CASE WHEN state = 'claimed' THEN 'planned' ELSE state END,
                   next_at = $2, reason = $3, lease_until = NULL, updated_at = nudge_now()
           WHERE send_id = $1::uuid AND state = $4 AND claim_no = $5""",
        send.send_id,
        until,
        reason,
        send.state,
        send.claim_no,
    )


# --------------------------------------------------------------------------------------------
# attempts and outcomes (fenced by claim_no)


async def mark_attempting(
    conn: Queryable,
    send: SendRow,
    lease: timedelta,
    tracked_links: Sequence[str] | None = None,
) -> SendRow | None:
    """Record, before calling the provider, that an attempt starts (RELIABILITY.md P7).

    `tracked_links` are the original URLs behind the click tokens of this attempt's message
    (None: not tracked). They are written in this same statement, committed before the
    provider is called, so a click can never arrive before the links it points into. Each
    attempt renders afresh and replaces them; an earlier attempt's message was not delivered
    (or the send would not be attempted again, docs/dispatch.md).
    """
    row = await conn.fetchrow(
        f"""UPDATE sends SET state = 'attempting', attempts = attempts + 1,
                   lease_until = nudge_now() + $3::interval, tracked_links = $4::jsonb,
                   updated_at = nudge_now()
            WHERE send_id = $1::uuid AND state = 'claimed' AND claim_no = $2
            RETURNING {_COLUMNS}""",
        send.send_id,
        send.claim_no,
        lease,
        None if tracked_links is None else list(tracked_links),
    )
    return None if row is None else SendRow.from_record(row)


def _event_id(send: SendRow, outcome: str) -> str:
    # One outcome event per send and outcome; a dead-letter replay is a new round.
    suffix = f":r{send.replays}" if send.replays else ""
    return f"{send.send_id}:{outcome}{suffix}"


def _outcome_event(
    send: SendRow, outcome: str, properties: dict[str, Any], *, event_id: str | None = None
) -> NewEvent:
    # `experiment_group` is always present ("" when none), so stats group every outcome by it
    # without a lookup and without telling "missing" from "empty".
    return NewEvent(
        workspace_id=send.workspace_id,
        event_id=event_id or _event_id(send, outcome),
        user_id=send.user_id,
        name=f"message.{outcome}",
        occurred_at=None,
        properties={
            "send_id": send.send_id,
            "campaign_id": send.campaign_id,
            "campaign_version": send.campaign_version,
            "channel": send.channel,
            "kind": send.kind,
            "experiment_group": send.experiment_group,
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
    release_cap: bool = False,
    event: str | None = None,
    properties: dict[str, Any] | None = None,
    also_from: str | None = None,
) -> bool:
    status = await conn.execute(
        """UPDATE sends SET state = $2, reason = $3, lease_until = NULL, next_at = NULL,
               provider_message_id = COALESCE($4, provider_message_id),
               sent_at = CASE WHEN $2 = 'sent' THEN nudge_now() ELSE sent_at END,
               cap_reserved_at = CASE WHEN $5 THEN NULL ELSE cap_reserved_at END,
               updated_at = nudge_now()
           WHERE send_id = $1::uuid AND claim_no = $6 AND state IN ($7, $8)""",
        send.send_id,
        state,
        reason,
        provider_message_id,
        release_cap,
        send.claim_no,
        send.state,
        also_from or send.state,
    )
    if not status.endswith(" 1"):
        return False
    if event is not None:
        extra: dict[str, Any] = {"reason": reason} if reason else {}
        await eventstore.append(
            conn, [_outcome_event(send, event, {**extra, **(properties or {})})]
        )
    return True


async def mark_sent(conn: Conn, send: SendRow, provider_message_id: str | None) -> bool:
    """Record delivery and append `message.sent`; False if the send is no longer ours.

    A reply that arrives after the sweeper parked this very attempt as ambiguous (same claim)
    still settles it: the provider's answer beats our guess."""
    return await _finish(
        conn,
        send,
        "sent",
        "",
        provider_message_id=provider_message_id,
        event="sent",
        also_from="ambiguous",
    )


async def mark_dead(
    conn: Conn, send: SendRow, reason: str, *, undeliverable_address: str | None = None
) -> bool:
    """Record a permanent failure: release the cap slot, dead-letter it and append
    `message.failed` (with `undeliverable_address` for a hard bounce, which the inline
    projection records so that later sends to that address are suppressed)."""
    properties: dict[str, Any] = {"attempts": send.attempts}
    if undeliverable_address is not None:
        properties["undeliverable_address"] = undeliverable_address
    if not await _finish(
        conn, send, "dead", reason, release_cap=True, event="failed", properties=properties
    ):
        return False
    await conn.execute(
        "INSERT INTO dead_letters (send_id, workspace_id, reason, attempts)"
        " VALUES ($1::uuid, $2, $3, $4)",
        send.send_id,
        send.workspace_id,
        reason,
        send.attempts,
    )
    return True


async def mark_suppressed(conn: Conn, send: SendRow, code: str, reason: str) -> bool:
    """Record a deliberate non-send, release its cap slot and append `message.suppressed`."""
    return await _finish(
        conn,
        send,
        "suppressed",
        reason,
        release_cap=True,
        event="suppressed",
        properties={"code": code},
    )


async def mark_ambiguous(conn: Conn, send: SendRow, reason: str) -> bool:
    """Park a send that may or may not have reached the provider (never retried; counted;
    its cap slot stays taken, since the user may have it)."""
    status = await conn.execute(
        """UPDATE sends SET state = 'ambiguous', reason = $3, lease_until = NULL, next_at = NULL,
               ambiguous_attempts = ambiguous_attempts + 1, updated_at = nudge_now()
           WHERE send_id = $1::uuid AND claim_no = $2 AND state = 'attempting'""",
        send.send_id,
        send.claim_no,
        reason,
    )
    return bool(status.endswith(" 1"))


async def mark_retry(
    conn: Queryable, send: SendRow, next_at: datetime, reason: str, *, ambiguous: bool = False
) -> bool:
    """Schedule the next attempt durably (its cap slot stays reserved)."""
    status = await conn.execute(
        """UPDATE sends SET state = 'retry_wait', next_at = $2, reason = $3, lease_until = NULL,
               ambiguous_attempts = ambiguous_attempts + CASE WHEN $4 THEN 1 ELSE 0 END,
               updated_at = nudge_now()
           WHERE send_id = $1::uuid AND claim_no = $5 AND state = $6""",
        send.send_id,
        next_at,
        reason,
        ambiguous,
        send.claim_no,
        send.state,
    )
    return bool(status.endswith(" 1"))


async def list_messages(conn: Queryable, workspace_id: str, user_id: str, limit: int) -> list[Any]:
    """A user's sends, newest first."""
    return await conn.fetch(
        """SELECT send_id::text AS send_id, campaign_id, channel, state, reason, attempts,
                  created_at, sent_at, next_at, ambiguous_attempts
           FROM sends WHERE workspace_id = $1 AND user_id = $2
           ORDER BY created_at DESC, send_id LIMIT $3""",
        workspace_id,
        user_id,
        limit,
    )


# --------------------------------------------------------------------------------------------
# workspace policy


async def load_policy(conn: Queryable, workspace_id: str) -> tuple[dict[str, Any], int] | None:
    """The stored (normalized) policy document and its version, or None."""
    row = await conn.fetchrow(
        "SELECT policy, version FROM workspace_policies WHERE workspace_id = $1", workspace_id
    )
    return None if row is None else (row["policy"], row["version"])


async def save_policy(conn: Conn, workspace_id: str, policy: dict[str, Any]) -> tuple[int, bool]:
    """Store the policy if it differs from the current one; (version, changed)."""
    current = await conn.fetchrow(
        "SELECT policy, version FROM workspace_policies WHERE workspace_id = $1 FOR UPDATE",
        workspace_id,
    )
    if current is not None and current["policy"] == policy:
        return current["version"], False
    version = 1 if current is None else current["version"] + 1
    await conn.execute(
        """INSERT INTO workspace_policies (workspace_id, policy, version)
           VALUES ($1, $2, $3)
           ON CONFLICT (workspace_id) DO UPDATE SET
               policy = EXCLUDED.policy, version = EXCLUDED.version, updated_at = nudge_now()""",
        workspace_id,
        policy,
        version,
    )
    return version, True


# --------------------------------------------------------------------------------------------
# dead letters


async def list_dead_letters(
    conn: Queryable, workspace_id: str, limit: int, include_replayed: bool
) -> list[Any]:
    """Dead letters of the workspace, newest first, with their send."""
    return await conn.fetch(
        """SELECT d.dead_letter_id, d.send_id::text AS send_id, d.reason, d.attempts,
                  d.created_at, d.replayed_at, s.user_id, s.campaign_id, s.channel, s.state
           FROM dead_letters d JOIN sends s USING (send_id)
           WHERE d.workspace_id = $1 AND ($3 OR d.replayed_at IS NULL)
           ORDER BY d.dead_letter_id DESC LIMIT $2""",
        workspace_id,
        limit,
        include_replayed,
    )


@dataclass(frozen=True)
class Replay:
    """What a replay did: `replayed` False when the dead letter had been replayed before."""

    send_id: str
    replayed: bool
    state: str


async def replay_dead_letter(conn: Conn, workspace_id: str, dead_letter_id: int) -> Replay | None:
    """Put a dead send back to planned under the same send_id (due now, a fresh retry window
    and attempt count); None if no such dead letter in the workspace."""
    row = await conn.fetchrow(
        """SELECT d.send_id::text AS send_id, d.replayed_at, s.state
           FROM dead_letters d JOIN sends s USING (send_id)
           WHERE d.dead_letter_id = $1 AND d.workspace_id = $2 FOR UPDATE""",
        dead_letter_id,
        workspace_id,
    )
    if row is None:
        return None
    if row["replayed_at"] is not None or row["state"] != "dead":
        return Replay(row["send_id"], False, row["state"])
    await conn.execute(
        """UPDATE sends SET state = 'planned', next_at = nudge_now(), lease_until = NULL,
               attempts = 0, replays = replays + 1, window_started_at = nudge_now(),
               reason = 'replayed from dead letter ' || $2::bigint, updated_at = nudge_now()
           WHERE send_id = $1::uuid AND state = 'dead'""",
        row["send_id"],
        dead_letter_id,
    )
    await conn.execute(
        "UPDATE dead_letters SET replayed_at = nudge_now() WHERE dead_letter_id = $1",
        dead_letter_id,
    )
    return Replay(row["send_id"], True, "planned")


# --------------------------------------------------------------------------------------------
# unsubscribes


async def append_unsubscribe(
    conn: Conn, workspace_id: str, user_id: str, channel: str, send_id: str, event_id: str
) -> bool:
    """Append `$identify {<channel>_subscribe: unsubscribed}` unless the user already is; the
    inline projection applies it in this transaction. True when an event was appended."""
    if channel not in ("email", "push", "sms"):
        raise ValueError(f"no subscription state for channel {channel!r}")
    current = await conn.fetchval(
        f"SELECT {channel}_subscribe FROM recipient_preferences"
        " WHERE workspace_id = $1 AND user_id = $2",
        workspace_id,
        user_id,
    )
    if current == "unsubscribed":
        return False
    event = NewEvent(
        workspace_id=workspace_id,
        event_id=event_id,
        user_id=user_id,
        name="$identify",
        occurred_at=None,
        properties={f"{channel}_subscribe": "unsubscribed"},
        context={"source": "list-unsubscribe", "send_id": send_id},
        metadata={},
    )
    return bool(await eventstore.append(conn, [event]))


# --------------------------------------------------------------------------------------------
# open and click tracking


async def tracked_send(conn: Queryable, send_id: str) -> tuple[SendRow, list[str] | None] | None:
    """A send and the links stored with its latest attempt (None: not tracked); None when
    there is no such send."""
    row = await conn.fetchrow(
        f"SELECT {_BASE_COLUMNS}, tracked_links FROM sends WHERE send_id = $1::uuid", send_id
    )
    if row is None:
        return None
    links = row["tracked_links"]
    if not isinstance(links, list):
        return SendRow.from_record(row), None
    return SendRow.from_record(row), [str(link) for link in links]


async def append_engagement(
    conn: Conn, send: SendRow, outcome: str, key: str, properties: dict[str, Any]
) -> bool:
    """Append `message.<outcome>` (opened, clicked) for the send with the usual outcome
    properties; True when it was new. The event id is `<send_id>:<key>`, so what the key names
    (the open, one link's click) is recorded once however often it happens; a replayed send
    shares its first round's events, as it is the same message again."""
    event = _outcome_event(send, outcome, properties, event_id=f"{send.send_id}:{key}")
    return bool(await eventstore.append(conn, [event]))
