"""Inactivity, after_first and threshold triggers, exceptions, and the fire-time re-checks."""

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.rules.cel import CompiledCampaign, compile_campaign, condition_event_names
from services.rules.domain import (
    Decision,
    DecisionKind,
    Membership,
    PendingInstance,
    RecordedEvent,
    UserState,
    evolve,
    instance_id,
    parse_campaign,
)
from services.rules.evaluation import decide_at_fire, decide_exception, decide_on_event

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
_positions = iter(range(1, 10**9))
EMAIL = {"channel": "email", "to": "{{ user.traits.email }}", "subject": "s", "body": "b"}


def event(name: str, at: datetime = T0, user: str = "u1", **properties: Any) -> RecordedEvent:
    position = next(_positions)
    return RecordedEvent("ws", user, f"e{position}", name, at, at, properties, position)


def campaign(trigger: dict[str, Any], version: int = 1, **fields: Any) -> CompiledCampaign:
    doc: dict[str, Any] = {"id": "c", "trigger": trigger, "message": EMAIL, **fields}
    return compile_campaign(parse_campaign(doc), version=version)


def fold(events: Iterable[RecordedEvent]) -> UserState | None:
    state = None
    for item in events:
        state = evolve(state, item)
    return state


def decide(
    compiled: CompiledCampaign,
    history: list[RecordedEvent],
    membership: Membership | None = None,
    paused: bool | None = None,
) -> list[Decision]:
    """Decisions about the last event of `history`, on state that includes it."""
    *before, trigger = history
    state_before = fold(before)
    state = evolve(state_before, trigger)
    return decide_on_event(
        compiled,
        trigger,
        state,
        membership or Membership(),
        trigger.received_at,
        paused=paused,
        state_before=state_before,
    )


def pending(decision: Decision, trigger: RecordedEvent, version: int = 1) -> Membership:
    """The membership of a user whose instance `decision` armed."""
    assert decision.instance_id is not None
    assert decision.due_at is not None
    instance = PendingInstance(decision.instance_id, version, "", trigger, decision.due_at)
    return Membership(pending=frozenset({""}), pending_instances={"": instance})


# --- inactivity -------------------------------------------------------------------------------

WIN_BACK = {"inactivity": {"event": "session_start", "for": "14d"}}


def test_a_session_arms_the_inactivity_check_for_received_at_plus_the_span() -> None:
    session = event("session_start")
    [armed] = decide(campaign(WIN_BACK), [session])
    assert armed.kind is DecisionKind.TRIGGERED
    assert armed.due_at == armed.delayed_until == T0 + timedelta(days=14)
    assert armed.instance_id == instance_id("ws", "c", 1, "u1", "", session.event_id)
    assert "no session_start for 14d" in armed.reason


def test_the_campaign_delay_adds_to_the_inactivity_due_time() -> None:
    [armed] = decide(campaign(WIN_BACK, delay="2h"), [event("session_start")])
    assert armed.due_at == T0 + timedelta(days=14, hours=2)


def test_every_later_session_re_arms_the_same_pending_instance() -> None:
    first = event("session_start")
    [armed] = decide(campaign(WIN_BACK), [first])
    day_13 = event("session_start", T0 + timedelta(days=13))
    [rearmed] = decide(campaign(WIN_BACK), [first, day_13], pending(armed, first))
    assert rearmed.kind is DecisionKind.REARMED
    assert rearmed.instance_id == armed.instance_id
    assert rearmed.due_at == T0 + timedelta(days=27)
    assert rearmed.detail == {"previous_due_at": (T0 + timedelta(days=14)).isoformat()}


def test_other_events_do_not_touch_the_inactivity_check() -> None:
    first = event("session_start")
    [armed] = decide(campaign(WIN_BACK), [first])
    other = event("page_viewed", T0 + timedelta(days=1))
    assert decide(campaign(WIN_BACK), [first, other], pending(armed, first)) == []


def test_a_pending_instance_of_an_older_version_is_superseded_by_the_new_one() -> None:
    first = event("session_start")
    [armed] = decide(campaign(WIN_BACK, version=1), [first])
    later = event("session_start", T0 + timedelta(days=2))
    cancelled, triggered = decide(
        campaign(WIN_BACK, version=2), [first, later], pending(armed, first)
    )
    assert (cancelled.kind, cancelled.version, cancelled.instance_id) == (
        DecisionKind.CANCELLED,
        1,
        armed.instance_id,
    )
    assert "superseded by version 2" in cancelled.reason
    assert (triggered.kind, triggered.version) == (DecisionKind.TRIGGERED, 2)
    assert triggered.instance_id == instance_id("ws", "c", 2, "u1", "", later.event_id)


def test_a_paused_campaign_arms_nothing_new_but_keeps_re_arming_pending_checks() -> None:
    first = event("session_start")
    [paused] = decide(campaign(WIN_BACK), [first], paused=True)
    assert paused.kind is DecisionKind.PAUSED
    [armed] = decide(campaign(WIN_BACK), [first])
    later = event("session_start", T0 + timedelta(days=1))
    [rearmed] = decide(campaign(WIN_BACK), [first, later], pending(armed, first), paused=True)
    assert rearmed.kind is DecisionKind.REARMED


def test_inactivity_re_eligibility_is_judged_at_the_due_time() -> None:
    compiled = campaign(WIN_BACK, reeligibility="30d")
    sent_20_days_ago = Membership(last_sent_at=T0 - timedelta(days=20))
    [armed] = decide(compiled, [event("session_start")], sent_20_days_ago)
    assert armed.kind is DecisionKind.TRIGGERED  # due in 14 d: 34 d after the last send
    sent_10_days_ago = Membership(last_sent_at=T0 - timedelta(days=10))
    [refused] = decide(compiled, [event("session_start")], sent_10_days_ago)
    assert refused.kind is DecisionKind.NOT_REELIGIBLE
    once = campaign(WIN_BACK)
    [never] = decide(
        once, [event("session_start")], Membership(last_sent_at=T0 - timedelta(days=400))
    )
    assert never.kind is DecisionKind.NOT_REELIGIBLE


def test_the_inactivity_audience_is_checked_when_arming() -> None:
    compiled = campaign(WIN_BACK, audience="has(user.traits.email)")
    [excluded] = decide(compiled, [event("session_start")])
    assert excluded.kind is DecisionKind.AUDIENCE_EXCLUDED
    [armed] = decide(compiled, [event("$identify", email="a@b.c"), event("session_start")])
    assert armed.kind is DecisionKind.TRIGGERED


def test_at_fire_time_a_user_who_came_back_is_still_active_and_nothing_is_sent() -> None:
    compiled = campaign(WIN_BACK)
    first = event("session_start")
    came_back = event("session_start", T0 + timedelta(days=13))
    state = fold([first, came_back])
    assert state is not None
    decision = decide_at_fire(compiled, first, state, Membership(), T0 + timedelta(days=14))
    assert decision.kind is DecisionKind.STILL_ACTIVE
    assert decision.due_at == T0 + timedelta(days=27)


def test_at_fire_time_a_user_inactive_for_the_span_gets_the_message() -> None:
    compiled = campaign(WIN_BACK)
    first = event("session_start")
    state = fold([first, event("page_viewed", T0 + timedelta(days=3))])
    assert state is not None
    due = T0 + timedelta(days=14)
    assert decide_at_fire(compiled, first, state, Membership(), due).kind is (
        DecisionKind.SEND_PLANNED
    )
    paused = decide_at_fire(compiled, first, state, Membership(), due, paused=True)
    assert paused.kind is DecisionKind.PAUSED


# --- after_first ------------------------------------------------------------------------------

ONBOARDING = {"after_first": {"event": "session_start", "offset": "1d"}}


def test_the_first_occurrence_arms_one_instance_an_offset_later() -> None:
    first = event("session_start")
    [armed] = decide(campaign(ONBOARDING, delay="1h"), [event("$identify", email="x"), first])
    assert armed.kind is DecisionKind.TRIGGERED
    assert armed.due_at == T0 + timedelta(days=1, hours=1)
    assert armed.instance_id == instance_id("ws", "c", 1, "u1", "", first.event_id)


def test_later_occurrences_decide_nothing() -> None:
    first = event("session_start")
    second = event("session_start", T0 + timedelta(hours=3))
    assert decide(campaign(ONBOARDING), [first, second]) == []
    assert decide(campaign(ONBOARDING), [event("page_viewed")]) == []


def test_a_zero_offset_first_occurrence_sends_now() -> None:
    [now] = decide(
        campaign({"after_first": {"event": "signup", "offset": "0s"}}), [event("signup")]
    )
    assert (now.kind, now.delayed_until, now.due_at) == (DecisionKind.TRIGGERED, None, T0)


# --- threshold --------------------------------------------------------------------------------

WHALE = {
    "threshold": "user.events['session_start'].last_7d.count >= 5"
    " || user.events['loyalty_page_viewed'].count >= 1"
}


def sessions(
    count: int, start: datetime = T0, every: timedelta = timedelta(hours=1)
) -> list[RecordedEvent]:
    return [event("session_start", start + every * i) for i in range(count)]


def test_a_threshold_fires_on_the_event_that_makes_the_condition_true() -> None:
    history = sessions(5)
    assert decide(campaign(WHALE), history[:4]) == []
    [crossed] = decide(campaign(WHALE), history)
    assert crossed.kind is DecisionKind.TRIGGERED
    assert crossed.event_id == history[-1].event_id
    assert crossed.reason == "threshold crossed; send now"


def test_a_threshold_that_stays_true_does_not_fire_again() -> None:
    history = sessions(7)
    assert decide(campaign(WHALE), history[:6]) == []
    assert decide(campaign(WHALE), history) == []
    assert (
        decide(campaign(WHALE), [*history, event("loyalty_page_viewed", T0 + timedelta(hours=8))])
        == []
    )


def test_either_side_of_the_condition_can_cross_it() -> None:
    [crossed] = decide(campaign(WHALE), [event("session_start"), event("loyalty_page_viewed")])
    assert crossed.kind is DecisionKind.TRIGGERED


def test_a_new_users_first_event_can_cross_a_threshold() -> None:
    [crossed] = decide(campaign(WHALE), [event("loyalty_page_viewed")])
    assert crossed.kind is DecisionKind.TRIGGERED


def test_events_that_cannot_change_the_condition_are_not_evaluated() -> None:
    history = sessions(5)
    assert decide(campaign(WHALE), [*history[:4], event("page_viewed"), history[4]])[0].kind is (
        DecisionKind.TRIGGERED
    )
    assert decide(campaign(WHALE), [*history, event("page_viewed")]) == []


def test_a_window_that_empties_with_time_rearms_the_edge_at_the_next_event() -> None:
    week_one = sessions(5)
    [first] = decide(campaign(WHALE), week_one)
    assert first.kind is DecisionKind.TRIGGERED
    # Ten days later the 7-day window is empty: the condition is false before the next session
    # (evaluated at that session's time), and a fifth session in the new window crosses again;
    # re-eligibility decides whether that second crossing may send.
    later = sessions(5, T0 + timedelta(days=10))
    assert decide(campaign(WHALE), [*week_one, *later[:4]]) == []
    once = Membership(last_sent_at=T0)
    [again] = decide(campaign(WHALE), [*week_one, *later], once)
    assert again.kind is DecisionKind.NOT_REELIGIBLE
    [weekly] = decide(campaign(WHALE, reeligibility="7d"), [*week_one, *later], once)
    assert weekly.kind is DecisionKind.TRIGGERED


def test_a_threshold_with_a_pending_instance_or_paused_campaign_does_not_enter() -> None:
    history = sessions(5)
    compiled = campaign(WHALE, delay="1h")
    [crossed] = decide(compiled, history)
    [paused] = decide(compiled, history, paused=True)
    assert paused.kind is DecisionKind.PAUSED
    [busy] = decide(compiled, history, pending(crossed, history[-1]))
    assert busy.kind is DecisionKind.ALREADY_PENDING


def test_a_failing_threshold_is_recorded_once_when_it_starts_failing() -> None:
    compiled = campaign({"threshold": "user.traits.plan == 'pro'"})
    [failed] = decide(compiled, [event("$identify", email="x")])
    assert failed.kind is DecisionKind.ERROR
    assert failed.detail["path"] == "trigger.threshold"
    assert decide(compiled, [event("$identify", email="x"), event("$identify", nickname="y")]) == []
    [crossed] = decide(compiled, [event("$identify", email="x"), event("$identify", plan="pro")])
    assert crossed.kind is DecisionKind.TRIGGERED


def test_threshold_decisions_are_deterministic() -> None:
    history = sessions(5)
    assert decide(campaign(WHALE), history) == decide(campaign(WHALE), history)


@pytest.mark.parametrize(
    ("condition", "names"),
    [
        ("user.events['a'].count > 1 || user.events.b.last_7d.count > 2", {"a", "b"}),
        ("user.traits.plan == 'pro'", {"$identify"}),
        ("user.timezone == 'Europe/Berlin' && user.events['a'].count > 0", {"$identify", "a"}),
        ("user.id == 'x'", set()),
        ("user.lifecycle == 'whale'", None),
        ("timestamp(user.last_seen) < timestamp('2026-01-01T00:00:00Z')", None),
        ("user.events.exists(name, name == 'a')", None),
        ("user['traits'].plan == 'pro'", None),
    ],
)
def test_the_events_that_can_change_a_condition(condition: str, names: set[str] | None) -> None:
    assert condition_event_names(condition) == (None if names is None else frozenset(names))


# --- exceptions -------------------------------------------------------------------------------

CART: dict[str, Any] = {
    "trigger": {"event": "add_to_cart"},
    "correlation_key": "cart_id",
    "delay": "1h",
    "exceptions": [
        {
            "event": "purchase",
            "match": "exception.properties.cart_id == trigger.properties.cart_id",
        }
    ],
}


def cart_instance(trigger: RecordedEvent) -> PendingInstance:
    correlation = str(trigger.properties["cart_id"])
    return PendingInstance(
        instance_id("ws", "c", 1, trigger.user_id, correlation, trigger.event_id),
        1,
        correlation,
        trigger,
        T0 + timedelta(hours=1),
    )


def test_a_purchase_of_the_same_cart_cancels_its_reminder_at_once() -> None:
    compiled = campaign(**CART)
    cart_a = event("add_to_cart", cart_id="A")
    purchase = event("purchase", T0 + timedelta(minutes=10), cart_id="A")
    state = fold([cart_a, purchase])
    assert state is not None
    decision = decide_exception(
        compiled, purchase, cart_instance(cart_a), state, purchase.received_at
    )
    assert decision is not None
    assert (decision.kind, decision.correlation, decision.event_id) == (
        DecisionKind.CANCELLED,
        "A",
        purchase.event_id,
    )
    assert decision.instance_id == cart_instance(cart_a).instance_id
    assert (
        decision.reason
        == f"cancelled by purchase {purchase.event_id!r} (exceptions[0].match is true)"
    )


def test_a_purchase_of_another_cart_cancels_nothing() -> None:
    compiled = campaign(**CART)
    cart_a = event("add_to_cart", cart_id="A")
    purchase_b = event("purchase", cart_id="B")
    state = fold([cart_a, purchase_b])
    assert state is not None
    assert decide_exception(compiled, purchase_b, cart_instance(cart_a), state, T0) is None


def test_an_exception_without_match_cancels_any_pending_instance() -> None:
    compiled = campaign(**dict(CART, exceptions=[{"event": "unsubscribe"}]))
    cart_a = event("add_to_cart", cart_id="A")
    leave = event("unsubscribe")
    state = fold([cart_a, leave])
    assert state is not None
    decision = decide_exception(compiled, leave, cart_instance(cart_a), state, T0)
    assert decision is not None
    assert decision.kind is DecisionKind.CANCELLED
    assert (
        decide_exception(compiled, event("page_viewed"), cart_instance(cart_a), state, T0) is None
    )


def test_a_failing_match_is_an_error_and_the_reminder_stays_pending() -> None:
    compiled = campaign(**CART)
    cart_a = event("add_to_cart", cart_id="A")
    purchase = event("purchase", total=3)
    state = fold([cart_a, purchase])
    assert state is not None
    decision = decide_exception(compiled, purchase, cart_instance(cart_a), state, T0)
    assert decision is not None
    assert decision.kind is DecisionKind.ERROR
    assert decision.detail["path"] == "exceptions[0].match"


def test_a_match_may_read_the_user_state_after_the_exception() -> None:
    rules = [{"event": "purchase", "match": "user.events['purchase'].sum['amount'] >= 100.0"}]
    compiled = campaign(**dict(CART, exceptions=rules))
    cart_a = event("add_to_cart", cart_id="A")
    small = event("purchase", amount=40)
    big = event("purchase", amount=70)
    state = fold([cart_a, small])
    assert state is not None
    assert decide_exception(compiled, small, cart_instance(cart_a), state, T0) is None
    state = evolve(state, big)
    decision = decide_exception(compiled, big, cart_instance(cart_a), state, T0)
    assert decision is not None
    assert decision.kind is DecisionKind.CANCELLED
