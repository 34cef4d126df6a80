"""Why was this sent, or not: a user's decisions for one campaign, with dispatch's outcomes.

Decisions come from the `decisions` table in the order they were recorded; each send the rules
planned is followed by what dispatch reported for it, read from the outcome events dispatch
appended to the event store (`message.sent`, `message.failed`, `message.suppressed`), so the
explanation needs nothing from dispatch's own tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nudge.db import Queryable
from services.rules import store

_LABELS: Mapping[str, str] = {
    "triggered": "triggered",
    "filtered_out": "filtered out",
    "audience_excluded": "filtered out by the audience",
    "not_reeligible": "not re-eligible",
    "already_pending": "not entered",
    "paused": "paused",
    "rearmed": "re-armed",
    "cancelled": "cancelled",
    "still_active": "not sent",
    "resumed": "resumed",
    "send_planned": "re-checked and sent",
    "held_out": "held out (not sent)",
    "no_matching_message": "not sent",
    "error": "error",
}


@dataclass(frozen=True)
class Explanation:
    """One line of a user's history with a campaign."""

    decided_at: datetime
    source: str
    kind: str
    reason: str
    summary: str
    version: int
    instance_id: str | None = None
    event_id: str | None = None
    send_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


def summarize_decision(row: store.DecisionRow) -> str:
    """One sentence for a recorded decision: its label, then the recorded reason."""
    label = _LABELS.get(row.kind, row.kind)
    if not row.reason:
        return label
    if row.reason.startswith(label):
        return row.reason
    return f"{label}: {row.reason}"


def summarize_outcome(outcome: store.OutcomeEvent) -> str:
    """One sentence for a delivery outcome reported by dispatch."""
    properties = outcome.properties
    reason = str(properties.get("reason") or "")
    channel = properties.get("channel", "")
    if outcome.name == "message.sent":
        return f"delivered by dispatch ({channel})"
    if outcome.name == "message.suppressed":
        code = properties.get("code")
        return (
            "suppressed downstream"
            + (f": {reason}" if reason else "")
            + (f" ({code})" if code else "")
        )
    if outcome.name == "message.failed":
        return "failed downstream" + (f": {reason}" if reason else "")
    return f"{outcome.name}" + (f": {reason}" if reason else "")


def merge(
    decisions: Sequence[store.DecisionRow], outcomes: Sequence[store.OutcomeEvent]
) -> list[Explanation]:
    """Decisions in recorded order, each planned send followed by its outcomes."""
    by_send: dict[str, list[store.OutcomeEvent]] = {}
    for outcome in outcomes:
        by_send.setdefault(str(outcome.properties.get("send_id")), []).append(outcome)
    lines: list[Explanation] = []
    for row in decisions:
        send = row.detail.get("send_id")
        lines.append(
            Explanation(
                decided_at=row.decided_at,
                source="rules",
                kind=row.kind,
                reason=row.reason,
                summary=summarize_decision(row),
                version=row.version,
                instance_id=row.instance_id,
                event_id=row.event_id,
                send_id=str(send) if send else None,
                detail=row.detail,
            )
        )
        for outcome in by_send.pop(str(send), []) if send else []:
            properties = outcome.properties
            lines.append(
                Explanation(
                    decided_at=outcome.received_at,
                    source="dispatch",
                    kind=outcome.name,
                    reason=str(properties.get("reason") or ""),
                    summary=summarize_outcome(outcome),
                    version=int(properties.get("campaign_version") or row.version),
                    instance_id=row.instance_id,
                    event_id=outcome.event_id,
                    send_id=str(send),
                    detail={k: v for k, v in properties.items() if k not in ("send_id", "reason")},
                )
            )
    return lines


async def explain(
    conn: Queryable, workspace_id: str, user_id: str, campaign_id: str
) -> list[Explanation]:
    """Every decision for the user and campaign, oldest first, with delivery outcomes."""
    decisions = await store.decisions_for(conn, workspace_id, user_id, campaign_id)
    send_ids = sorted({str(d.detail["send_id"]) for d in decisions if d.detail.get("send_id")})
    outcomes = await store.outcome_events(conn, workspace_id, user_id, send_ids)
    return merge(decisions, outcomes)
