from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nudge.ids import deterministic_id
from services.rules.cel import CompiledCampaign, compile_campaign
from services.rules.domain import (
    DecisionKind,
    Membership,
    RecordedEvent,
    UserState,
    evolve,
    instance_id,
    parse_campaign,
    send_id,
)
from services.rules.evaluation import EvaluationContext, decide_at_fire, decide_on_event

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
_positions = iter(range(1, 10**9))


def event(name: str, at: datetime = NOW, user: str = "u1", **properties: Any) -> RecordedEvent:
    position = next(_positions)
    return RecordedEvent("ws", user, f"e{position}", name, at, at, properties, position)


def campaign(version: int = 1, **fields: Any) -> CompiledCampaign:
    doc: dict[str, Any] = {
        "id": "order-shipped",
        "trigger": {"event": "order_shipped", "where": "event.properties.total > 20"},
        "delay": "0s",
        "message": {
            "channel": "email",
            "to": "{{ user.traits.email }}",
            "subject": "Your order {{ event.properties.order_id }}",
            "body": "On its way",
        },
    }
    if "messages" in fields:
        del doc["message"]
    doc.update(fields)
    return compile_campaign(parse_campaign(doc), version=version)


def state_after(trigger: RecordedEvent, *before: RecordedEvent) -> UserState:
    state = None
    for item in (*before, trigger):
        state = evolve(state, item)
    assert state is not None
    return state


def decide(
    compiled: CompiledCampaign,
    trigger: RecordedEvent,
    *before: RecordedEvent,
    membership: Membership | None = None,
    now: datetime = NOW,
) -> Any:
    decisions = decide_on_event(
        compiled, trigger, state_after(trigger, *before), membership or Membership(), now
    )
    assert len(decisions) == 1
    return decisions[0]


@pytest.mark.parametrize("total", [25, 25.0])
def test_an_order_over_20_triggers_an_immediate_send(total: float) -> None:
    trigger = event("order_shipped", total=total, order_id="A1")
    decision = decide(campaign(), trigger)
    assert decision.kind is DecisionKind.TRIGGERED
    assert decision.due_at == NOW
    assert decision.delayed_until is None
    assert decision.event_id == trigger.event_id
    assert (decision.workspace_id, decision.campaign_id, decision.version) == (
        "ws",
        "order-shipped",
        1,
    )
    assert decision.instance_id == instance_id("ws", "order-shipped", 1, "u1", "", trigger.event_id)


def test_a_delay_sets_delayed_until() -> None:
    decision = decide(campaign(delay="1h"), event("order_shipped", total=30.0))
    assert decision.kind is DecisionKind.TRIGGERED
    assert decision.delayed_until == decision.due_at == NOW + timedelta(hours=1)
    assert "delayed until" in decision.reason


@pytest.mark.parametrize("total", [20, 20.0, 3.5])
def test_an_order_of_20_or_less_is_filtered_out(total: float) -> None:
    decision = decide(campaign(), event("order_shipped", total=total))
    assert decision.kind is DecisionKind.FILTERED_OUT
    assert decision.instance_id is None


def test_a_missing_property_is_recorded_as_an_error_decision() -> None:
    decision = decide(campaign(), event("order_shipped", order_id="A1"))
    assert decision.kind is DecisionKind.ERROR
    assert "Key not found" in decision.error
    assert decision.detail == {"path": "trigger.where", "expression": "event.properties.total > 20"}
    assert decision.reason.startswith("trigger.where failed")


def test_other_events_decide_nothing() -> None:
    other = event("order_placed", total=50.0)
    assert decide_on_event(campaign(), other, state_after(other), Membership(), NOW) == []
    inactivity = campaign(trigger={"inactivity": {"event": "session_start", "for": "14d"}})
    shipped = event("order_shipped", total=50.0)
    assert decide_on_event(inactivity, shipped, state_after(shipped), Membership(), NOW) == []


def test_the_audience_sees_user_state_that_includes_the_trigger() -> None:
    compiled = campaign(
        audience="user.traits.country == 'DE' && user.events['order_shipped'].count >= 2"
    )
    identify = event("$identify", country="DE")
    first = event("order_shipped", total=30.0)
    assert decide(compiled, first, identify).kind is DecisionKind.AUDIENCE_EXCLUDED
    second = event("order_shipped", total=30.0)
    assert decide(compiled, second, identify, first).kind is DecisionKind.TRIGGERED
    elsewhere = event("$identify", country="FR")
    assert decide(compiled, second, identify, first, elsewhere).kind is (
        DecisionKind.AUDIENCE_EXCLUDED
    )


def test_a_user_who_never_did_a_referenced_event_is_counted_as_zero() -> None:
    compiled = campaign(audience="user.events['feature_x_used'].count == 0")
    assert decide(compiled, event("order_shipped", total=30.0)).kind is DecisionKind.TRIGGERED


def test_traits_with_integer_values_support_double_arithmetic() -> None:
    compiled = campaign(audience="user.traits.age + 1.0 >= 18.0")
    trigger = event("order_shipped", total=30.0)
    assert decide(compiled, trigger, event("$identify", age=17)).kind is DecisionKind.TRIGGERED


def test_without_reeligibility_a_user_receives_a_campaign_once_ever() -> None:
    received = Membership(last_entered_at=NOW, last_sent_at=NOW - timedelta(days=400))
    decision = decide(campaign(), event("order_shipped", total=30.0), membership=received)
    assert decision.kind is DecisionKind.NOT_REELIGIBLE
    assert "once per user" in decision.reason


def test_with_reeligibility_a_user_may_receive_it_again_after_the_window() -> None:
    compiled = campaign(reeligibility="7d")
    recently = Membership(last_sent_at=NOW - timedelta(days=6))
    assert decide(compiled, event("order_shipped", total=30.0), membership=recently).kind is (
        DecisionKind.NOT_REELIGIBLE
    )
    long_ago = Membership(last_sent_at=NOW - timedelta(days=7))
    assert decide(compiled, event("order_shipped", total=30.0), membership=long_ago).kind is (
        DecisionKind.TRIGGERED
    )


def test_an_entry_that_was_never_sent_does_not_use_up_eligibility() -> None:
    cancelled = Membership(last_entered_at=NOW - timedelta(hours=2), last_sent_at=None)
    decision = decide(campaign(), event("order_shipped", total=30.0), membership=cancelled)
    assert decision.kind is DecisionKind.TRIGGERED


def test_only_one_instance_is_pending_per_user_and_campaign() -> None:
    pending = Membership(last_entered_at=NOW, pending=frozenset({""}))
    decision = decide(campaign(), event("order_shipped", total=30.0), membership=pending)
    assert decision.kind is DecisionKind.ALREADY_PENDING


def test_two_carts_make_two_instances_when_correlated() -> None:
    compiled = campaign(
        trigger={"event": "add_to_cart"}, delay="1h", correlation_key="cart_id", reeligibility="0s"
    )
    first = decide(compiled, event("add_to_cart", cart_id="c1"))
    assert (first.kind, first.correlation) == (DecisionKind.TRIGGERED, "c1")
    pending = Membership(pending=frozenset({"c1"}))
    again = decide(compiled, event("add_to_cart", cart_id="c1"), membership=pending)
    assert again.kind is DecisionKind.ALREADY_PENDING
    second = decide(compiled, event("add_to_cart", cart_id="c2"), membership=pending)
    assert (second.kind, second.correlation) == (DecisionKind.TRIGGERED, "c2")
    assert second.instance_id != first.instance_id


def test_numeric_correlation_values_are_the_same_whatever_their_json_type() -> None:
    compiled = campaign(trigger={"event": "add_to_cart"}, correlation_key="cart_id")
    as_int = decide(compiled, event("add_to_cart", cart_id=42))
    as_float = decide(compiled, event("add_to_cart", cart_id=42.0))
    assert as_int.correlation == as_float.correlation == "42"


def test_a_trigger_without_the_correlation_property_is_an_error() -> None:
    compiled = campaign(trigger={"event": "add_to_cart"}, correlation_key="cart_id")
    decision = decide(compiled, event("add_to_cart", sku="x"))
    assert decision.kind is DecisionKind.ERROR
    assert decision.detail == {"path": "correlation_key"}


def test_a_paused_campaign_records_that_it_is_paused() -> None:
    assert decide(campaign(status="paused"), event("order_shipped", total=30.0)).kind is (
        DecisionKind.PAUSED
    )
    trigger = event("order_shipped", total=30.0)
    resumed = decide_on_event(
        campaign(status="paused"), trigger, state_after(trigger), Membership(), NOW, paused=False
    )
    assert resumed[0].kind is DecisionKind.TRIGGERED


def test_decisions_are_deterministic() -> None:
    trigger = event("order_shipped", total=30.0)
    state = state_after(trigger)
    assert decide_on_event(campaign(), trigger, state, Membership(), NOW) == decide_on_event(
        campaign(), trigger, state, Membership(), NOW
    )


def test_ids_match_the_shared_id_scheme_and_escape_separators() -> None:
    assert instance_id("ws", "c", 2, "u", "k", "e") == deterministic_id(
        "instance", "ws", "c", 2, "u", "k", "e"
    )
    assert send_id("ws", "c", 2, "u", "e", "email") == deterministic_id(
        "send", "ws", "c", 2, "u", "e", "email"
    )
    assert send_id("ws", "c", 1, "u|x", "e", "email") != send_id("ws", "c", 1, "u", "x|e", "email")
    assert instance_id("ws", "c", 1, "u", "") != instance_id("ws", "c", 2, "u", "")


def test_one_context_serves_several_campaigns() -> None:
    by_total = campaign()
    by_history = campaign(id="loyal", audience="user.events['order_shipped'].last_30d.count >= 1")
    trigger = event("order_shipped", total=30.0)
    state = state_after(trigger)
    context = EvaluationContext.for_campaigns(trigger, state, NOW, [by_total, by_history])
    for compiled in (by_total, by_history):
        (decision,) = decide_on_event(compiled, trigger, state, Membership(), NOW, context=context)
        assert decision.kind is DecisionKind.TRIGGERED


def test_a_context_that_lacks_a_campaigns_references_is_refused() -> None:
    narrow = campaign()
    wide = campaign(audience="user.events['x'].count == 0")
    trigger = event("order_shipped", total=30.0)
    state = state_after(trigger)
    context = EvaluationContext.for_campaigns(trigger, state, NOW, [narrow])
    with pytest.raises(ValueError, match="for_campaigns"):
        decide_on_event(wide, trigger, state, Membership(), NOW, context=context)


def test_a_filter_on_the_event_alone_does_not_need_the_user_view() -> None:
    compiled = campaign()
    trigger = event("order_shipped", total=30.0)
    context = EvaluationContext.for_campaigns(trigger, state_after(trigger), NOW, [compiled])
    assert compiled.where is not None
    assert context.activation_for(compiled.where) is not context.activation


BRANCHED: dict[str, Any] = {
    "audience": "user.traits.country == 'DE'",
    "delay": "1d",
    "messages": [
        {
            "when": "user.events['feature_x_used'].count == 0",
            "message": {
                "channel": "email",
                "to": "a@example.test",
                "subject": "Try X",
                "body": "x",
            },
        },
        {"message": {"channel": "push", "to": "{{ user.traits.device }}", "body": "welcome"}},
    ],
}


def test_at_fire_time_the_first_matching_message_is_planned() -> None:
    compiled = campaign(**BRANCHED)
    trigger = event("order_shipped", total=30.0)
    identify = event("$identify", country="DE")
    later = NOW + timedelta(days=1)
    fresh = state_after(trigger, identify)
    decision = decide_at_fire(compiled, trigger, fresh, Membership(), later)
    assert (decision.kind, decision.branch) == (DecisionKind.SEND_PLANNED, 0)
    assert decision.send_id == send_id("ws", "order-shipped", 1, "u1", trigger.event_id, "email")
    used_x = evolve(fresh, event("feature_x_used", NOW + timedelta(hours=2)))
    decision = decide_at_fire(compiled, trigger, used_x, Membership(), later)
    assert (decision.kind, decision.branch) == (DecisionKind.SEND_PLANNED, 1)
    assert decision.send_id == send_id("ws", "order-shipped", 1, "u1", trigger.event_id, "push")


def test_at_fire_time_audience_reeligibility_and_pause_are_rechecked() -> None:
    compiled = campaign(**BRANCHED)
    trigger = event("order_shipped", total=30.0)
    moved = state_after(trigger, event("$identify", country="DE"), event("$identify", country="FR"))
    later = NOW + timedelta(days=1)
    assert decide_at_fire(compiled, trigger, moved, Membership(), later).kind is (
        DecisionKind.AUDIENCE_EXCLUDED
    )
    stays = state_after(trigger, event("$identify", country="DE"))
    sent = Membership(last_sent_at=NOW)
    assert decide_at_fire(compiled, trigger, stays, sent, later).kind is DecisionKind.NOT_REELIGIBLE
    paused = decide_at_fire(compiled, trigger, stays, Membership(), later, paused=True)
    assert paused.kind is DecisionKind.PAUSED
    instance = instance_id("ws", "order-shipped", 1, "u1", "", trigger.event_id)
    planned = decide_at_fire(compiled, trigger, stays, Membership(), later, instance=instance)
    assert planned.instance_id == instance


def test_at_fire_time_no_matching_branch_is_recorded() -> None:
    only_conditional: dict[str, Any] = dict(BRANCHED, messages=BRANCHED["messages"][:1])
    compiled = campaign(**only_conditional)
    trigger = event("order_shipped", total=30.0)
    state = state_after(trigger, event("$identify", country="DE"), event("feature_x_used"))
    decision = decide_at_fire(compiled, trigger, state, Membership(), NOW)
    assert decision.kind is DecisionKind.NO_MATCHING_MESSAGE
