"""Pure parts of `nudge why` (summaries, merging dispatch outcomes) and `nudge replay`."""

from datetime import UTC, datetime, timedelta
from typing import Any

from services.rules.domain import RecordedEvent, evolve
from services.rules.domain import state_to_dict as to_doc
from services.rules.explain import merge, summarize_decision
from services.rules.replay import compare_user
from services.rules.store import DecisionRow, OutcomeEvent

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def row(kind: str, reason: str, **detail: Any) -> DecisionRow:
    return DecisionRow("ws", "u1", "c", 1, "i-1", "e1", kind, reason, detail, T0)


def test_summaries_say_what_happened_and_why() -> None:
    assert summarize_decision(row("triggered", "delayed until X")) == "triggered: delayed until X"
    assert summarize_decision(row("cancelled", "cancelled by purchase 'p1'")) == (
        "cancelled by purchase 'p1'"
    )
    assert summarize_decision(row("audience_excluded", "audience is false")) == (
        "filtered out by the audience: audience is false"
    )
    assert summarize_decision(row("not_reeligible", "already received at T")) == (
        "not re-eligible: already received at T"
    )
    assert summarize_decision(row("send_planned", "re-checked and sent: message 0 (email)")) == (
        "re-checked and sent: message 0 (email)"
    )


def test_each_planned_send_is_followed_by_what_dispatch_reported() -> None:
    decisions = [
        row("triggered", "delayed until X"),
        row("send_planned", "re-checked and sent: message 0 (email)", send_id="s-1", branch=0),
        row("send_planned", "re-checked and sent: message 0 (email)", send_id="s-2", branch=0),
    ]
    outcomes = [
        OutcomeEvent(
            "s-2:suppressed",
            "message.suppressed",
            T0 + timedelta(seconds=2),
            {"send_id": "s-2", "reason": "quiet hours", "code": "quiet_hours", "channel": "email"},
        ),
        OutcomeEvent(
            "s-1:sent",
            "message.sent",
            T0 + timedelta(seconds=1),
            {"send_id": "s-1", "channel": "email"},
        ),
    ]
    lines = merge(decisions, outcomes)
    assert [(line.source, line.kind, line.send_id) for line in lines] == [
        ("rules", "triggered", None),
        ("rules", "send_planned", "s-1"),
        ("dispatch", "message.sent", "s-1"),
        ("rules", "send_planned", "s-2"),
        ("dispatch", "message.suppressed", "s-2"),
    ]
    assert lines[2].summary == "delivered by dispatch (email)"
    assert lines[4].summary == "suppressed downstream: quiet hours (quiet_hours)"


def event(name: str, position: int, **properties: Any) -> RecordedEvent:
    at = T0 + timedelta(minutes=position)
    return RecordedEvent("ws", "u1", f"e{position}", name, at, at, properties, position)


def test_replay_compares_states_field_by_field_and_the_last_position() -> None:
    state = evolve(evolve(None, event("session_start", 1)), event("purchase", 2, amount=5))
    live = (to_doc(state), 2)
    assert compare_user("u1", live, (state, 2)) is None
    other = evolve(state, event("purchase", 3, amount=1))
    mismatch = compare_user("u1", live, (other, 3))
    assert mismatch is not None
    assert (mismatch.problem, mismatch.fields) == (
        "state",
        ("event_count", "events", "last_seen", "newest_received_at"),
    )
    moved = compare_user("u1", live, (state, 7))
    assert moved is not None
    assert moved.problem == "position"
    missing = compare_user("u1", None, (state, 2))
    assert missing is not None
    assert missing.problem == "missing"
    unexpected = compare_user("u1", live, None)
    assert unexpected is not None
    assert unexpected.problem == "unexpected"
