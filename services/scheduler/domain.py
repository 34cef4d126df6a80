"""Timers: what a valid timer is, and how long the firing loop may sleep. Standard library only."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

TOPIC = re.compile(r"^[a-z0-9_-]{1,64}$")
WORKSPACE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
MAX_PAYLOAD_BYTES = 64 * 1024


class TimerState(Enum):
    """Where a timer is in its life (the `timers.state` column)."""

    PENDING = "pending"
    FIRED = "fired"
    CANCELLED = "cancelled"


class TimerRejectedError(Exception):
    """A timer request is invalid; `field` names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class TimerRequest:
    """A validated request to arm (or re-arm) a timer."""

    timer_id: uuid.UUID
    workspace_id: str
    topic: str
    due_at: datetime
    payload: bytes
    traceparent: str


@dataclass(frozen=True)
class Timer:
    """A stored timer."""

    timer_id: uuid.UUID
    workspace_id: str
    topic: str
    due_at: datetime
    payload: bytes
    traceparent: str
    state: TimerState
    version: int

    @property
    def msg_id(self) -> str:
        """The `Nats-Msg-Id` of this arming's firing: one per (timer, version)."""
        return f"{self.timer_id}:{self.version}"


def parse_timer_id(value: str, field: str = "timer_id") -> uuid.UUID:
    """The timer id as a UUID."""
    if not value:
        raise TimerRejectedError(field, "is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise TimerRejectedError(field, "must be a UUID") from None


def validate_timer_request(
    *,
    timer_id: str,
    workspace_id: str,
    topic: str,
    due_at: datetime | None,
    payload: bytes,
    traceparent: str,
) -> TimerRequest:
    """Check a Schedule request; raise TimerRejectedError naming the first bad field."""
    parsed_id = parse_timer_id(timer_id, "timer.timer_id")
    if not WORKSPACE_ID.match(workspace_id):
        raise TimerRejectedError("timer.workspace_id", f"must match {WORKSPACE_ID.pattern}")
    if not TOPIC.match(topic):
        raise TimerRejectedError("timer.topic", f"must match {TOPIC.pattern}")
    if due_at is None:
        raise TimerRejectedError("timer.due_at", "is required")
    if due_at.tzinfo is None:
        raise TimerRejectedError("timer.due_at", "must carry a time zone")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise TimerRejectedError("timer.payload", f"is larger than {MAX_PAYLOAD_BYTES} bytes")
    if traceparent and not TRACEPARENT.match(traceparent):
        raise TimerRejectedError("timer.traceparent", "must be a W3C traceparent")
    return TimerRequest(
        timer_id=parsed_id,
        workspace_id=workspace_id,
        topic=topic,
        due_at=due_at,
        payload=payload,
        traceparent=traceparent,
    )


CONTENDED_RETRY_S = 0.025


def seconds_to_sleep(next_due_in: timedelta | None, max_idle_s: float, *, fired: int) -> float:
    """How long the firing loop sleeps: until the next due time, at most `max_idle_s`.

    `next_due_in` is the earliest pending due time minus the database time (None: no pending
    timer); `fired` is how many timers the loop's last claim fired.
    """
    if next_due_in is None:
        return max_idle_s
    due_in_s = next_due_in.total_seconds()
    if due_in_s <= 0 and fired == 0:
        # Due, yet nothing was claimable: another replica holds those rows while it publishes
        # them. Look again shortly instead of spinning on the database.
        return min(CONTENDED_RETRY_S, max_idle_s)
    return min(max(due_in_s, 0.0), max_idle_s)
