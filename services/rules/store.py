"""All SQL of the rules service: campaigns, user states, instances, decisions, outbox, inbox."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from nudge.db import Conn, Queryable
from services.rules.domain import RecordedEvent

CAMPAIGNS_CHANNEL = "nudge_campaigns"
OUTBOX_CHANNEL = "nudge_rules_outbox"


@dataclass(frozen=True)
class CampaignVersion:
    """One stored version of a campaign definition."""

    workspace_id: str
    campaign_id: str
    version: int
    definition: dict[str, Any]
    definition_hash: str
    status: str
    created_at: datetime


_CAMPAIGN_COLUMNS = """c.workspace_id, c.campaign_id, v.version, v.definition, v.definition_hash,
                       c.status, v.created_at"""


def _campaign(row: Any) -> CampaignVersion:
    return CampaignVersion(**dict(row))


async def current_campaign(
    conn: Queryable, workspace_id: str, campaign_id: str
) -> CampaignVersion | None:
    """The current version of a campaign."""
    row = await conn.fetchrow(
        f"""SELECT {_CAMPAIGN_COLUMNS} FROM campaigns c
            JOIN campaign_versions v USING (workspace_id, campaign_id)
            WHERE c.workspace_id = $1 AND c.campaign_id = $2 AND v.version = c.current_version""",
        workspace_id,
        campaign_id,
    )
    return None if row is None else _campaign(row)


async def campaign_version(
    conn: Queryable, workspace_id: str, campaign_id: str, version: int
) -> CampaignVersion | None:
    """A specific version (with the campaign's current status)."""
    row = await conn.fetchrow(
        f"""SELECT {_CAMPAIGN_COLUMNS} FROM campaigns c
            JOIN campaign_versions v USING (workspace_id, campaign_id)
            WHERE c.workspace_id = $1 AND c.campaign_id = $2 AND v.version = $3""",
        workspace_id,
        campaign_id,
        version,
    )
    return None if row is None else _campaign(row)


async def current_campaigns(
    conn: Queryable, workspace_id: str | None = None
) -> list[CampaignVersion]:
    """Current versions of all campaigns (of one workspace, or all)."""
    rows = await conn.fetch(
        f"""SELECT {_CAMPAIGN_COLUMNS} FROM campaigns c
            JOIN campaign_versions v USING (workspace_id, campaign_id)
            WHERE v.version = c.current_version AND ($1::text IS NULL OR c.workspace_id = $1)
            ORDER BY c.workspace_id, c.campaign_id""",
        workspace_id,
    )
    return [_campaign(r) for r in rows]


async def all_campaign_versions(conn: Queryable) -> list[CampaignVersion]:
    """Every stored version of every campaign (with the campaign's current status)."""
    rows = await conn.fetch(
        f"""SELECT {_CAMPAIGN_COLUMNS} FROM campaigns c
            JOIN campaign_versions v USING (workspace_id, campaign_id)
            ORDER BY c.workspace_id, c.campaign_id, v.version"""
    )
    return [_campaign(r) for r in rows]


async def set_campaign_status(
    conn: Conn, workspace_id: str, campaign_id: str, status: str
) -> tuple[CampaignVersion, str] | None:
    """Set a campaign's live status; return the current version and the status it had before.

    None when the campaign does not exist. Takes the campaign's advisory lock, like
    `save_campaign_version`, so a status change and a new version never interleave.
    """
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))", workspace_id, campaign_id
    )
    current = await current_campaign(conn, workspace_id, campaign_id)
    if current is None:
        return None
    if current.status != status:
        await conn.execute(
            "UPDATE campaigns SET status = $3, updated_at = nudge_now()"
            " WHERE workspace_id = $1 AND campaign_id = $2",
            workspace_id,
            campaign_id,
            status,
        )
        await conn.execute(f"NOTIFY {CAMPAIGNS_CHANNEL}")
    saved = await current_campaign(conn, workspace_id, campaign_id)
    assert saved is not None
    return saved, current.status


async def campaigns_generation(conn: Queryable) -> tuple[int, datetime | None, int]:
    """Changes whenever any campaign or workspace policy changes (to invalidate caches)."""
    row = await conn.fetchrow(
        """SELECT count(*) AS n, max(updated_at) AS t,
                  (SELECT coalesce(sum(version), 0) FROM workspace_policies) AS p
           FROM campaigns"""
    )
    assert row is not None
    return int(row["n"]), row["t"], int(row["p"])


async def global_controls(conn: Queryable) -> dict[str, dict[str, Any]]:
    """Each workspace's `global_control` block of its policy (`nudge workspace apply`), by
    workspace id. The policy is dispatch's document; rules only reads this one block."""
    rows = await conn.fetch(
        """SELECT workspace_id, policy->'global_control' AS control FROM workspace_policies
           WHERE policy ? 'global_control'"""
    )
    return {r["workspace_id"]: dict(r["control"]) for r in rows if r["control"]}


async def save_campaign_version(
    conn: Conn,
    workspace_id: str,
    campaign_id: str,
    definition: dict[str, Any],
    digest: str,
    status: str,
) -> tuple[CampaignVersion, bool]:
    """Store a definition as the next version unless it equals the current one."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))", workspace_id, campaign_id
    )
    current = await current_campaign(conn, workspace_id, campaign_id)
    if current is not None and current.definition_hash == digest and current.status == status:
        return current, False
    if current is not None and current.definition_hash == digest:
        await conn.execute(
            "UPDATE campaigns SET status = $3, updated_at = nudge_now()"
            " WHERE workspace_id = $1 AND campaign_id = $2",
            workspace_id,
            campaign_id,
            status,
        )
    else:
        version = 1 if current is None else current.version + 1
        await conn.execute(
            """INSERT INTO campaign_versions (workspace_id, campaign_id, version, definition,
                                              definition_hash)
               VALUES ($1, $2, $3, $4, $5)""",
            workspace_id,
            campaign_id,
            version,
            definition,
            digest,
        )
        await conn.execute(
            """INSERT INTO campaigns (workspace_id, campaign_id, current_version, status)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (workspace_id, campaign_id) DO UPDATE
               SET current_version = EXCLUDED.current_version, status = EXCLUDED.status,
                   updated_at = nudge_now()""",
            workspace_id,
            campaign_id,
            version,
            status,
        )
    await conn.execute(f"NOTIFY {CAMPAIGNS_CHANNEL}")
    saved = await current_campaign(conn, workspace_id, campaign_id)
    assert saved is not None
    return saved, True


async def load_states(
    conn: Queryable, keys: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Stored state documents by (workspace_id, user_id)."""
    pairs = list(keys)
    rows = await conn.fetch(
        """SELECT s.workspace_id, s.user_id, s.state
           FROM unnest($1::text[], $2::text[]) AS k(w, u)
           JOIN user_states s ON s.workspace_id = k.w AND s.user_id = k.u""",
        [w for w, _ in pairs],
        [u for _, u in pairs],
    )
    return {(r["workspace_id"], r["user_id"]): r["state"] for r in rows}


async def save_states(conn: Conn, states: Sequence[tuple[str, str, dict[str, Any], int]]) -> None:
    """Upsert (workspace_id, user_id, state, last_position) rows."""
    if not states:
        return
    await conn.execute(
        """INSERT INTO user_states (workspace_id, user_id, state, last_position)
           SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::bigint[])
           ON CONFLICT (workspace_id, user_id) DO UPDATE
           SET state = EXCLUDED.state, last_position = EXCLUDED.last_position""",
        [s[0] for s in states],
        [s[1] for s in states],
        [s[2] for s in states],
        [s[3] for s in states],
    )


async def load_state(conn: Queryable, workspace_id: str, user_id: str) -> dict[str, Any] | None:
    """One user's state document."""
    value = await conn.fetchval(
        "SELECT state FROM user_states WHERE workspace_id = $1 AND user_id = $2",
        workspace_id,
        user_id,
    )
    return None if value is None else dict(value)


@dataclass(frozen=True)
class Instance:
    """A campaign instance: one user's journey through one campaign version."""

    instance_id: str
    workspace_id: str
    campaign_id: str
    version: int
    user_id: str
    correlation: str
    trigger_event_id: str
    trigger_event: dict[str, Any]
    state: str
    due_at: datetime
    experiment_group: str | None = None
    experiment_bucket: float | None = None
    experiment_salt: str | None = None
    entered_at: datetime | None = None
    exposed_at: datetime | None = None
    send_id: str | None = None


_INSTANCE_COLUMNS = """i.instance_id::text AS instance_id, i.workspace_id, i.campaign_id,
                       i.version, i.user_id, i.correlation, i.trigger_event_id, i.trigger_event,
                       i.state, i.due_at, i.experiment_group, i.experiment_bucket,
                       i.experiment_salt, i.entered_at, i.exposed_at, i.send_id::text AS send_id"""


async def insert_instances(conn: Conn, instances: Sequence[Instance]) -> None:
    """Record new instances; an instance id seen before is left as it is (replay no-op)."""
    if not instances:
        return
    await conn.executemany(
        """INSERT INTO campaign_instances (instance_id, workspace_id, campaign_id, version,
               user_id, correlation, trigger_event_id, trigger_event, state, due_at,
               experiment_group, experiment_bucket, experiment_salt, entered_at, exposed_at,
               send_id)
           VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                   $16::uuid)
           ON CONFLICT (instance_id) DO NOTHING""",
        [
            (
                i.instance_id,
                i.workspace_id,
                i.campaign_id,
                i.version,
                i.user_id,
                i.correlation,
                i.trigger_event_id,
                i.trigger_event,
                i.state,
                i.due_at,
                i.experiment_group,
                i.experiment_bucket,
                i.experiment_salt,
                i.entered_at,
                i.exposed_at,
                i.send_id,
            )
            for i in instances
        ],
    )


async def lock_instance(conn: Conn, instance_id: str) -> Instance | None:
    """Load an instance FOR UPDATE."""
    row = await conn.fetchrow(
        f"SELECT {_INSTANCE_COLUMNS} FROM campaign_instances i"
        " WHERE i.instance_id = $1::uuid FOR UPDATE",
        instance_id,
    )
    return None if row is None else Instance(**dict(row))


@dataclass(frozen=True)
class Exposure:
    """A pending instance sent (`sent`) or held out (`held_out`) at `exposed_at`."""

    instance_id: str
    state: str
    exposed_at: datetime
    send_id: str


async def set_instance_state(conn: Conn, instance_id: str, state: str) -> None:
    """Move an instance to cancelled or suppressed."""
    await conn.execute(
        "UPDATE campaign_instances SET state = $2, updated_at = nudge_now()"
        " WHERE instance_id = $1::uuid",
        instance_id,
        state,
    )


async def expose_instances(conn: Conn, exposures: Sequence[Exposure]) -> None:
    """Record sends and hold-outs: the state, when, and the (would-be) send's id."""
    if not exposures:
        return
    await conn.executemany(
        """UPDATE campaign_instances SET state = $2, exposed_at = $3, send_id = $4::uuid,
                  updated_at = nudge_now()
           WHERE instance_id = $1::uuid""",
        [(e.instance_id, e.state, e.exposed_at, e.send_id) for e in exposures],
    )


@dataclass(frozen=True)
class MemberSummary:
    """A user's history with one campaign, summed over its instances."""

    workspace_id: str
    user_id: str
    campaign_id: str
    last_entered_at: datetime | None
    last_sent_at: datetime | None


async def member_summaries(
    conn: Queryable, keys: Iterable[tuple[str, str]], exclude_instance: str | None = None
) -> list[MemberSummary]:
    """Per (workspace, user, campaign): when the user last entered and last received it."""
    pairs = list(keys)
    rows = await conn.fetch(
        """SELECT i.workspace_id, i.user_id, i.campaign_id,
                  max(i.created_at) AS last_entered_at,
                  max(coalesce(i.exposed_at, i.due_at))
                      FILTER (WHERE i.state IN ('sent', 'held_out')) AS last_sent_at
           FROM unnest($1::text[], $2::text[]) AS k(w, u)
           JOIN campaign_instances i ON i.workspace_id = k.w AND i.user_id = k.u
           WHERE $3::uuid IS NULL OR i.instance_id <> $3::uuid
           GROUP BY 1, 2, 3""",
        [w for w, _ in pairs],
        [u for _, u in pairs],
        exclude_instance,
    )
    return [MemberSummary(**dict(r)) for r in rows]


async def pending_instances(
    conn: Queryable,
    keys: Iterable[tuple[str, str]],
    exclude_instance: str | None = None,
    *,
    lock: bool = False,
) -> list[Instance]:
    """The users' pending instances; with `lock`, locked FOR UPDATE (in instance id order).

    The projector locks them for the batch so that a fired timer re-checking one of them
    (`lock_instance`) and an exception cancelling it serialize: one of them sees the other's
    outcome instead of both acting on 'pending'.
    """
    pairs = list(keys)
    rows = await conn.fetch(
        f"""SELECT {_INSTANCE_COLUMNS}
            FROM unnest($1::text[], $2::text[]) AS k(w, u)
            JOIN campaign_instances i ON i.workspace_id = k.w AND i.user_id = k.u
            WHERE i.state = 'pending' AND ($3::uuid IS NULL OR i.instance_id <> $3::uuid)
            ORDER BY i.instance_id
            {"FOR UPDATE OF i" if lock else ""}""",
        [w for w, _ in pairs],
        [u for _, u in pairs],
        exclude_instance,
    )
    return [Instance(**dict(r)) for r in rows]


@dataclass(frozen=True)
class Rearm:
    """A pending instance moved to a new due time by a newer trigger event."""

    instance_id: str
    due_at: datetime
    trigger_event_id: str
    trigger_event: dict[str, Any]
    entered_at: datetime | None = None


async def rearm_instances(conn: Conn, rearms: Sequence[Rearm]) -> None:
    """Move pending instances to their new due time, trigger event and entry time."""
    if not rearms:
        return
    await conn.executemany(
        """UPDATE campaign_instances
           SET due_at = $2, trigger_event_id = $3, trigger_event = $4,
               entered_at = COALESCE($5, entered_at), updated_at = nudge_now()
           WHERE instance_id = $1::uuid AND state = 'pending'""",
        [
            (r.instance_id, r.due_at, r.trigger_event_id, r.trigger_event, r.entered_at)
            for r in rearms
        ],
    )


async def cancel_instances(conn: Conn, instance_ids: Sequence[str]) -> None:
    """Cancel pending instances (an instance already sent or suppressed is left as it is)."""
    if not instance_ids:
        return
    await conn.execute(
        """UPDATE campaign_instances SET state = 'cancelled', updated_at = nudge_now()
           WHERE instance_id = ANY($1::uuid[]) AND state = 'pending'""",
        list(instance_ids),
    )


async def overdue_pending_instances(
    conn: Queryable,
    workspace_id: str,
    campaign_id: str,
    margin: timedelta,
    lookahead: timedelta = timedelta(0),
) -> list[Instance]:
    """Pending instances of a campaign (any version) whose timer (due_at + margin) is due by
    now + lookahead: while the campaign was paused their timer fired and they stayed pending,
    or it is about to fire."""
    rows = await conn.fetch(
        f"""SELECT {_INSTANCE_COLUMNS} FROM campaign_instances i
            WHERE i.workspace_id = $1 AND i.campaign_id = $2 AND i.state = 'pending'
              AND i.due_at + $3::interval <= (SELECT nudge_now()) + $4::interval
            ORDER BY i.due_at, i.instance_id""",
        workspace_id,
        campaign_id,
        margin,
        lookahead,
    )
    return [Instance(**dict(r)) for r in rows]


@dataclass(frozen=True)
class DecisionRow:
    """A recorded decision (for `nudge why`)."""

    workspace_id: str
    user_id: str
    campaign_id: str
    version: int
    instance_id: str | None
    event_id: str | None
    kind: str
    reason: str
    detail: dict[str, Any]
    decided_at: datetime


async def insert_decisions(conn: Conn, decisions: Sequence[DecisionRow]) -> None:
    """Append decisions."""
    if not decisions:
        return
    await conn.executemany(
        """INSERT INTO decisions (workspace_id, user_id, campaign_id, version, instance_id,
                                  event_id, kind, reason, detail, decided_at)
           VALUES ($1, $2, $3, $4, $5::uuid, $6, $7, $8, $9, $10)""",
        [
            (
                d.workspace_id,
                d.user_id,
                d.campaign_id,
                d.version,
                d.instance_id,
                d.event_id,
                d.kind,
                d.reason,
                d.detail,
                d.decided_at,
            )
            for d in decisions
        ],
    )


@dataclass(frozen=True)
class OutboxItem:
    """Work for another service, delivered after the deciding transaction commits."""

    kind: str
    msg_id: str
    payload: bytes
    subject: str = ""
    traceparent: str = ""


async def insert_outbox(conn: Conn, items: Sequence[OutboxItem]) -> None:
    """Queue outbox items and wake the outbox worker at commit."""
    if not items:
        return
    await conn.executemany(
        "INSERT INTO rules_outbox (kind, msg_id, subject, payload, traceparent)"
        " VALUES ($1, $2, $3, $4, $5)",
        [(i.kind, i.msg_id, i.subject, i.payload, i.traceparent) for i in items],
    )
    await conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")


async def claim_outbox(conn: Conn, limit: int) -> list[tuple[int, OutboxItem]]:
    """Lock the oldest outbox items (one worker at a time keeps their order)."""
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext('rules_outbox'))"):
        return []
    rows = await conn.fetch(
        """SELECT outbox_id, kind, msg_id, subject, payload, traceparent FROM rules_outbox
           ORDER BY outbox_id LIMIT $1""",
        limit,
    )
    return [
        (
            r["outbox_id"],
            OutboxItem(r["kind"], r["msg_id"], bytes(r["payload"]), r["subject"], r["traceparent"]),
        )
        for r in rows
    ]


async def delete_outbox(conn: Conn, outbox_ids: Sequence[int]) -> None:
    """Remove delivered items."""
    await conn.execute("DELETE FROM rules_outbox WHERE outbox_id = ANY($1::bigint[])", outbox_ids)


async def record_inbox(conn: Conn, item_id: str) -> bool:
    """Mark a NATS item applied; False when it was applied before (a redelivery)."""
    status = await conn.execute(
        "INSERT INTO rules_inbox (item_id) VALUES ($1) ON CONFLICT DO NOTHING", item_id
    )
    return bool(status.endswith(" 1"))


async def projection_watermark(conn: Queryable, reader: str) -> int:
    """The xmin under which the projection last read (0 before its first read)."""
    value = await conn.fetchval(
        "SELECT last_xmin::text FROM reader_checkpoints WHERE reader = $1", reader
    )
    return 0 if value is None else int(value)


async def decisions_for(
    conn: Queryable, workspace_id: str, user_id: str, campaign_id: str | None
) -> list[DecisionRow]:
    """Decisions for a user (and campaign), oldest first."""
    rows = await conn.fetch(
        """SELECT workspace_id, user_id, campaign_id, version, instance_id::text AS instance_id,
                  event_id, kind, reason, detail, decided_at
           FROM decisions WHERE workspace_id = $1 AND user_id = $2
             AND ($3::text IS NULL OR campaign_id = $3)
           ORDER BY decision_id""",
        workspace_id,
        user_id,
        campaign_id,
    )
    return [DecisionRow(**dict(r)) for r in rows]


# --------------------------------------------------------------------------------------------
# explaining decisions, and checking the projection against a replay


@dataclass(frozen=True)
class OutcomeEvent:
    """A delivery outcome appended by dispatch (`message.sent`, `.failed`, `.suppressed`)."""

    event_id: str
    name: str
    received_at: datetime
    properties: dict[str, Any]


async def outcome_events(
    conn: Queryable, workspace_id: str, user_id: str, send_ids: Sequence[str]
) -> list[OutcomeEvent]:
    """The outcome events dispatch appended for these sends, in store order."""
    if not send_ids:
        return []
    rows = await conn.fetch(
        """SELECT event_id, name, received_at, properties FROM events
           WHERE workspace_id = $1 AND user_id = $2 AND name LIKE 'message.%'
             AND properties->>'send_id' = ANY($3::text[])
           ORDER BY global_position""",
        workspace_id,
        user_id,
        list(send_ids),
    )
    return [OutcomeEvent(**dict(r)) for r in rows]


async def live_states(conn: Queryable, workspace_id: str) -> dict[str, tuple[dict[str, Any], int]]:
    """Every projected state of a workspace with its last applied position, by user id."""
    rows = await conn.fetch(
        "SELECT user_id, state, last_position FROM user_states WHERE workspace_id = $1",
        workspace_id,
    )
    return {r["user_id"]: (r["state"], r["last_position"]) for r in rows}


def recorded_event(row: Any) -> RecordedEvent:
    """The domain view of an `events` row (selected with the columns of REPLAY_EVENTS_SQL)."""
    return RecordedEvent(
        workspace_id=row["workspace_id"],
        user_id=row["user_id"],
        event_id=row["event_id"],
        name=row["name"],
        occurred_at=row["occurred_at"],
        received_at=row["received_at"],
        properties=row["properties"],
        global_position=row["global_position"],
    )


REPLAY_EVENTS_SQL = """
SELECT global_position, workspace_id, event_id, user_id, name, occurred_at, received_at,
       properties
FROM events
WHERE workspace_id = $1 AND (tx_id, global_position) <= ($2::text::xid8, $3)
ORDER BY user_id, tx_id, global_position
"""
"""A workspace's events up to a projection checkpoint, each user's in commit order (the order
the projector applied them), one user after another so that a replay holds one state at a
time."""


# --------------------------------------------------------------------------------------------
# conversions


async def conversion_instances(
    conn: Queryable,
    keys: Iterable[tuple[str, str]],
    campaign_ids: Sequence[str],
    entered_after: datetime,
) -> list[Instance]:
    """The users' instances of these campaigns entered after `entered_after`, in entry order
    (the candidates a conversion event may count for; any state: a cancelled or held-out
    instance converts too)."""
    pairs = list(keys)
    rows = await conn.fetch(
        f"""SELECT {_INSTANCE_COLUMNS}
            FROM unnest($1::text[], $2::text[]) AS k(w, u)
            JOIN campaign_instances i ON i.workspace_id = k.w AND i.user_id = k.u
            WHERE i.campaign_id = ANY($3::text[]) AND i.entered_at > $4
            ORDER BY i.entered_at, i.instance_id""",
        [w for w, _ in pairs],
        [u for _, u in pairs],
        list(campaign_ids),
        entered_after,
    )
    return [Instance(**dict(r)) for r in rows]


@dataclass(frozen=True)
class ConversionRow:
    """A conversion event counted for an instance."""

    instance_id: str
    event_id: str
    workspace_id: str
    campaign_id: str
    user_id: str
    converted_at: datetime


async def insert_conversions(conn: Conn, rows: Sequence[ConversionRow]) -> None:
    """Record conversions; one already recorded is left as it is (replay no-op)."""
    if not rows:
        return
    await conn.executemany(
        """INSERT INTO campaign_conversions (instance_id, event_id, workspace_id, campaign_id,
               user_id, converted_at)
           VALUES ($1::uuid, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
        [
            (r.instance_id, r.event_id, r.workspace_id, r.campaign_id, r.user_id, r.converted_at)
            for r in rows
        ],
    )
