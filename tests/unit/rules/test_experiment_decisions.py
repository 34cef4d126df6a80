"""Experiments in the campaign definition and in the pure decisions: parsing and versioning,
the group assigned at entry, the group's delay, variant messages, and control users held out at
fire time (what would have been sent, not sent)."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nudge.grpcserver import InvalidArgumentError
from services.rules.application import validate_campaign
from services.rules.cel import CompiledCampaign, compile_campaign
from services.rules.domain import (
    CampaignError,
    DecisionKind,
    Membership,
    PendingInstance,
    RecordedEvent,
    evolve,
    parse_campaign,
)
from services.rules.evaluation import decide_at_fire, decide_on_event
from services.rules.experiments import GlobalControl, assign

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EMAIL = {"channel": "email", "to": "{{ user.traits.email }}", "subject": "s", "body": "b"}
EXPERIMENT = {
    "control": 20,
    "variants": [
        {"name": "wait-1h", "weight": 50, "delay": "1h"},
        {"name": "wait-24h", "weight": 50, "delay": "24h", "message": {"subject": "again?"}},
    ],
}


def document(**fields: Any) -> dict[str, Any]:
    return {
        "id": "cart",
        "trigger": {"event": "add_to_cart"},
        "delay": "2h",
        "message": EMAIL,
        "experiment": EXPERIMENT,
        **fields,
    }


def compiled(**fields: Any) -> CompiledCampaign:
    return compile_campaign(parse_campaign(document(**fields)), version=3)


def event(user: str, name: str = "add_to_cart", at: datetime = T0) -> RecordedEvent:
    return RecordedEvent("ws", user, f"{user}-{name}", name, at, at, {}, 1)


def users_in(group: str, campaign: str = "cart", count: int = 1) -> list[str]:
    """Users that `assign` puts in `group` of the test experiment."""
    definition = parse_campaign(document())
    found = [
        f"u{n}"
        for n in range(500)
        if assign("ws", campaign, f"u{n}", definition.experiment).group == group
    ]
    assert len(found) >= count
    return found[:count]


# --- the definition ---------------------------------------------------------------------------


def test_experiment_and_conversion_round_trip_and_are_part_of_the_version() -> None:
    conversion = {"event": "purchase", "within": "3d", "match": "conversion.properties.x == 1"}
    definition = parse_campaign(document(conversion=conversion))
    assert parse_campaign(definition.to_dict()) == definition
    assert definition.to_dict()["conversion"] == conversion
    assert "purchase" in definition.referenced_event_names()
    assert ("conversion.match", conversion["match"]) in definition.expressions()
    salted = parse_campaign(document(experiment=EXPERIMENT | {"salt": "reset-1"}))
    assert salted.definition_hash() != parse_campaign(document()).definition_hash()


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"kind": "transactional"}, "experiment"),
        ({"experiment": {"control": 100}}, "experiment.control"),
        ({"experiment": EXPERIMENT | {"colour": 1}}, "experiment.colour"),
        ({"experiment": {"variants": [{"name": "a"}]}}, "experiment"),
        (
            {"experiment": {"control": 10, "variants": [{"name": "a", "message": {"to": 1}}]}},
            "experiment.variants[0].message.to",
        ),
        (
            {
                "experiment": {
                    "control": 10,
                    "variants": [{"name": "a", "message": {"channel": "sms"}}],
                }
            },
            "experiment.variants[0].message.channel",
        ),
        ({"conversion": {"event": "purchase"}}, "conversion.within"),
        (
            {"conversion": {"event": "purchase", "within": "1d", "match": "conversion +"}},
            "conversion.match",
        ),
        (
            {"conversion": {"event": "purchase", "within": "1d", "match": "exception.x == 1"}},
            "conversion.match",
        ),
    ],
)
def test_bad_experiment_blocks_name_the_field(fields: dict[str, Any], path: str) -> None:
    with pytest.raises(CampaignError) as raised:
        compile_campaign(parse_campaign(document(**fields)))
    assert raised.value.path == path


def test_a_variant_message_that_makes_the_message_invalid_is_refused() -> None:
    bad = {"control": 10, "variants": [{"name": "a", "message": {"subject": "{{ user.name"}}]}
    with pytest.raises(InvalidArgumentError) as raised:
        validate_campaign(document(experiment=bad))
    assert "experiment.variants[0].message.subject" in str(raised.value.field)


def test_each_group_has_its_delay_and_messages() -> None:
    campaign = compiled()
    assert campaign.delay_for("wait-1h") == timedelta(hours=1)
    assert campaign.delay_for("wait-24h") == timedelta(hours=24)
    assert campaign.delay_for("control") == timedelta(hours=2)  # the campaign's own
    assert campaign.delay_for(None) == timedelta(hours=2)
    assert campaign.messages_for("wait-24h")[0].message.subject == "again?"
    assert campaign.messages_for("wait-1h")[0].message.subject == "s"
    assert campaign.messages_for("control")[0].message.subject == "s"


# --- entry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["control", "wait-1h", "wait-24h"])
def test_entry_records_the_group_and_uses_its_delay(group: str) -> None:
    campaign = compiled()
    [user] = users_in(group)
    trigger = event(user)
    [decision] = decide_on_event(campaign, trigger, evolve(None, trigger), Membership(), T0)
    assert decision.kind is DecisionKind.TRIGGERED
    expected = assign("ws", "cart", user, campaign.definition.experiment)
    assert decision.detail == {"group": group, "bucket": expected.bucket, "salt": ""}
    assert decision.due_at == T0 + campaign.delay_for(group)
    assert expected.reason in decision.reason


def test_no_experiment_means_treatment_and_the_campaign_delay() -> None:
    campaign = compile_campaign(
        parse_campaign({k: v for k, v in document().items() if k != "experiment"})
    )
    trigger = event("u1")
    [decision] = decide_on_event(campaign, trigger, evolve(None, trigger), Membership(), T0)
    assert decision.detail["group"] == "treatment"
    assert decision.due_at == T0 + timedelta(hours=2)
    assert "treatment" not in decision.reason


def test_global_control_holds_out_of_marketing_but_not_transactional() -> None:
    everyone = GlobalControl(percent=50)
    held = [
        f"u{n}"
        for n in range(100)
        if assign("ws", "x", f"u{n}", None, global_control=everyone).held_out
    ]
    plain = {k: v for k, v in document().items() if k != "experiment"}
    marketing = compile_campaign(parse_campaign(plain))
    transactional = compile_campaign(parse_campaign(plain | {"kind": "transactional"}))
    for user in held[:5]:
        trigger = event(user)
        state = evolve(None, trigger)
        [entry] = decide_on_event(
            marketing, trigger, state, Membership(), T0, global_control=everyone
        )
        assert entry.detail["group"] == "global_control"
        assert "global control" in entry.reason
        [entry] = decide_on_event(
            transactional, trigger, state, Membership(), T0, global_control=everyone
        )
        assert entry.detail["group"] == "treatment"


# --- fire -------------------------------------------------------------------------------------


def test_a_control_user_is_held_out_with_what_would_have_been_sent() -> None:
    campaign = compiled()
    [user] = users_in("control")
    trigger = event(user)
    state = evolve(None, trigger)
    due = T0 + timedelta(hours=2)
    held = decide_at_fire(campaign, trigger, state, Membership(), due, group="control")
    sent = decide_at_fire(campaign, trigger, state, Membership(), due, group="wait-1h")
    assert held.kind is DecisionKind.HELD_OUT
    assert sent.kind is DecisionKind.SEND_PLANNED
    assert (held.branch, held.send_id) == (sent.branch, sent.send_id)
    assert "held out: control" in held.reason


def test_held_out_needs_the_same_checks_as_a_send() -> None:
    campaign = compiled(audience="user.id == 'somebody else'")
    [user] = users_in("control")
    trigger = event(user)
    decision = decide_at_fire(
        campaign, trigger, evolve(None, trigger), Membership(), T0, group="control"
    )
    assert decision.kind is DecisionKind.AUDIENCE_EXCLUDED


def test_an_inactivity_rearm_keeps_the_delay_of_the_instance_group() -> None:
    campaign = compiled(trigger={"inactivity": {"event": "session_start", "for": "14d"}})
    [user] = users_in("wait-24h")
    first = event(user, "session_start")
    state = evolve(None, first)
    [entry] = decide_on_event(campaign, first, state, Membership(), T0)
    assert entry.due_at == T0 + timedelta(days=14) + timedelta(hours=24)
    assert entry.instance_id is not None
    pending = PendingInstance(entry.instance_id, 3, "", first, entry.due_at, group="wait-24h")
    membership = Membership(pending=frozenset({""}), pending_instances={"": pending})
    later = RecordedEvent("ws", user, "s2", "session_start", T0, T0 + timedelta(days=2), {}, 2)
    [rearm] = decide_on_event(campaign, later, evolve(state, later), membership, later.received_at)
    assert rearm.kind is DecisionKind.REARMED
    assert rearm.due_at == later.received_at + timedelta(days=14) + timedelta(hours=24)
