import copy
import json
from datetime import timedelta
from typing import Any

import pytest
import yaml

from services.rules.domain import (
    ActionTrigger,
    AfterFirstTrigger,
    CampaignError,
    ExceptionRule,
    InactivityTrigger,
    Message,
    ThresholdTrigger,
    parse_campaign,
)

ISSUE_2_EXAMPLE = """
id: order-shipped
name: Order shipped email
trigger:
  event: order_shipped
  where: event.properties.total > 20        # CEL; variables: event, user
delay: 0s
message:
  channel: email
  to: "{{ user.traits.email }}"
  subject: "Your order {{ event.properties.order_id }} is on its way"
  body: "Hi {{ user.traits.first_name | default: 'there' }}, it arrives {{ event.properties.eta }}."
"""

ABANDONED_CART = """
id: abandoned-cart
trigger: {event: add_to_cart, where: "event.properties.value >= 10"}
audience: "user.traits.country == 'DE'"
delay: 1h
correlation_key: cart_id
exceptions:
  - event: purchase
    match: "exception.properties.cart_id == trigger.properties.cart_id"
reeligibility: 7d
messages:
  - when: "user.events['feature_x_used'].count == 0"
    message: {channel: email, to: "{{ user.traits.email }}", subject: "A", body: "a"}
  - message: {channel: push, to: "{{ user.traits.device }}", body: "b"}
"""


def example() -> dict[str, Any]:
    doc = yaml.safe_load(ISSUE_2_EXAMPLE)
    assert isinstance(doc, dict)
    return doc


def test_the_issue_2_example_parses() -> None:
    campaign = parse_campaign(example())
    assert campaign.id == "order-shipped"
    assert campaign.name == "Order shipped email"
    assert campaign.trigger == ActionTrigger("order_shipped", "event.properties.total > 20")
    assert campaign.delay == timedelta(0)
    assert campaign.status == "active"
    assert campaign.kind == "marketing"
    assert campaign.reeligibility is None
    (branch,) = campaign.messages
    assert branch.when is None
    assert branch.message == Message(
        channel="email",
        to="{{ user.traits.email }}",
        subject="Your order {{ event.properties.order_id }} is on its way",
        body="Hi {{ user.traits.first_name | default: 'there' }}, it arrives "
        "{{ event.properties.eta }}.",
    )


def test_issue_3_shared_fields_parse() -> None:
    campaign = parse_campaign(yaml.safe_load(ABANDONED_CART))
    assert campaign.audience == "user.traits.country == 'DE'"
    assert campaign.delay == timedelta(hours=1)
    assert campaign.correlation_key == "cart_id"
    assert campaign.exceptions == (
        ExceptionRule("purchase", "exception.properties.cart_id == trigger.properties.cart_id"),
    )
    assert campaign.reeligibility == timedelta(days=7)
    assert [b.when for b in campaign.messages] == ["user.events['feature_x_used'].count == 0", None]
    assert campaign.messages[1].message.channel == "push"


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        ({"event": "add_to_cart"}, ActionTrigger("add_to_cart")),
        (
            {"inactivity": {"event": "session_start", "for": "14d"}},
            InactivityTrigger("session_start", timedelta(days=14)),
        ),
        (
            {"after_first": {"event": "session_start", "offset": "1d"}},
            AfterFirstTrigger("session_start", timedelta(days=1)),
        ),
        (
            {"threshold": "user.events['session_start'].last_7d.count >= 5"},
            ThresholdTrigger("user.events['session_start'].last_7d.count >= 5"),
        ),
    ],
)
def test_every_trigger_kind_of_issue_3_parses(trigger: dict[str, Any], expected: object) -> None:
    doc = example() | {"trigger": trigger}
    assert parse_campaign(doc).trigger == expected


def test_to_dict_is_the_normalized_form_and_parses_back_to_the_same_definition() -> None:
    for text in (ISSUE_2_EXAMPLE, ABANDONED_CART):
        campaign = parse_campaign(yaml.safe_load(text))
        stored = json.loads(json.dumps(campaign.to_dict()))
        assert parse_campaign(stored) == campaign
        assert parse_campaign(stored).to_dict() == stored
    normalized = parse_campaign(example()).to_dict()
    assert "message" not in normalized
    assert normalized["messages"][0]["message"]["channel"] == "email"
    assert normalized["delay"] == "0s"
    assert normalized["priority"] == 0


def test_equivalent_definitions_hash_the_same() -> None:
    a = example()
    b = example() | {"delay": "60m", "kind": "marketing", "priority": 0}
    a["delay"] = "1h"
    assert parse_campaign(a).definition_hash() == parse_campaign(b).definition_hash()
    assert len(parse_campaign(a).definition_hash()) == 64


def test_any_edit_changes_the_hash_but_pausing_does_not() -> None:
    base = parse_campaign(example()).definition_hash()
    edited = example()
    edited["trigger"]["where"] = "event.properties.total > 30"
    assert parse_campaign(edited).definition_hash() != base
    assert parse_campaign(example() | {"status": "paused"}).definition_hash() == base


def test_defaults_and_optional_fields() -> None:
    doc = example()
    del doc["name"]
    del doc["delay"]
    campaign = parse_campaign(doc | {"kind": "transactional", "priority": 5, "status": "paused"})
    assert campaign.name == "order-shipped"
    assert campaign.delay == timedelta(0)
    assert (campaign.kind, campaign.priority, campaign.status) == ("transactional", 5, "paused")


@pytest.mark.parametrize(
    ("channel", "fields"),
    [
        ("webhook", {"url": "https://example.test/hook", "payload": {"a": [1, {"b": None}]}}),
        ("sms", {"to": "{{ user.traits.phone }}", "body": "hi"}),
        ("push", {"to": "{{ user.traits.device }}", "body": "hi", "subject": "title"}),
        ("console", {"body": "hi"}),
        ("email", {"to": "x@example.test", "subject": "s", "body": "b", "html": "<p>b</p>"}),
    ],
)
def test_every_channel_parses_with_its_fields(channel: str, fields: dict[str, Any]) -> None:
    campaign = parse_campaign(example() | {"message": {"channel": channel, **fields}})
    assert campaign.messages[0].message.to_dict() == {"channel": channel, **fields}


def mutate(path: str, value: Any) -> dict[str, Any]:
    """The issue 2 example (in `messages` form for `messages[...]` paths) with one change."""
    doc = example()
    if path.startswith("messages"):
        doc["messages"] = [
            {"message": copy.deepcopy(doc["message"])},
            {"message": doc.pop("message")},
        ]
    parts = path.replace("[", ".").replace("]", "").split(".")
    target: Any = doc
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    last = parts[-1]
    if value is DELETE:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return doc


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "error_path"),
    [
        ("id", DELETE, "id"),
        ("id", "Order_Shipped", "id"),
        ("id", 12, "id"),
        ("id", "-x", "id"),
        ("name", "", "name"),
        ("trigger", DELETE, "trigger"),
        ("trigger", "order_shipped", "trigger"),
        ("trigger.event", "", "trigger.event"),
        ("trigger.event", "bad\nname", "trigger.event"),
        ("trigger.where", 5, "trigger.where"),
        ("trigger.where", "x" * 5000, "trigger.where"),
        ("trigger.unknown", 1, "trigger.unknown"),
        ("trigger.threshold", "user.x", "trigger"),
        ("trigger.inactivity", {"event": "a", "for": "1d"}, "trigger"),
        ("delay", "soon", "delay"),
        ("delay", 5, "delay"),
        ("reeligibility", "1y", "reeligibility"),
        ("status", "stopped", "status"),
        ("kind", "promo", "kind"),
        ("priority", "high", "priority"),
        ("priority", True, "priority"),
        ("priority", 10_000, "priority"),
        ("correlation_key", "cart id!", "correlation_key"),
        ("audience", ["x"], "audience"),
        ("exceptions", {"event": "purchase"}, "exceptions"),
        ("exceptions", [{"event": "purchase"}, {"match": "true"}], "exceptions[1].event"),
        ("exceptions", [{"event": "purchase", "when": "true"}], "exceptions[0].when"),
        ("exceptions", ["purchase"], "exceptions[0]"),
        ("unexpected", 1, "unexpected"),
        ("message.channel", "pigeon", "message.channel"),
        ("message.channel", DELETE, "message.channel"),
        ("message.subject", DELETE, "message.subject"),
        ("message.to", 42, "message.to"),
        ("message.cc", "x", "message.cc"),
        ("message.payload", [1], "message.payload"),
        ("message.payload", {"a": float("nan")}, "message.payload.a"),
        ("message.payload", {"a": {1: "b"}}, "message.payload.a"),
        ("message", "hello", "message"),
        ("messages[1].message.channel", "fax", "messages[1].message.channel"),
        ("messages[1].message.body", DELETE, "messages[1].message.body"),
        ("messages[1].message", DELETE, "messages[1].message"),
        ("messages[0].when", 3, "messages[0].when"),
        ("messages[0].unless", "true", "messages[0].unless"),
    ],
)
def test_every_invalid_field_is_reported_with_its_path(
    path: str, value: Any, error_path: str
) -> None:
    with pytest.raises(CampaignError) as raised:
        parse_campaign(mutate(path, value))
    assert raised.value.path == error_path
    assert str(raised.value).startswith(f"{error_path}: ")


@pytest.mark.parametrize(
    ("trigger", "error_path"),
    [
        ({"inactivity": {"event": "session_start"}}, "trigger.inactivity.for"),
        ({"inactivity": {"event": "session_start", "for": "0s"}}, "trigger.inactivity.for"),
        ({"inactivity": {"for": "1d"}}, "trigger.inactivity.event"),
        ({"inactivity": {"event": "s", "for": "1d", "x": 1}}, "trigger.inactivity.x"),
        ({"inactivity": "session_start"}, "trigger.inactivity"),
        (
            {"after_first": {"event": "session_start", "offset": "soon"}},
            "trigger.after_first.offset",
        ),
        ({"threshold": ""}, "trigger.threshold"),
        ({"threshold": "true", "where": "true"}, "trigger.where"),
        ({}, "trigger"),
    ],
)
def test_trigger_errors_name_the_nested_field(trigger: dict[str, Any], error_path: str) -> None:
    with pytest.raises(CampaignError) as raised:
        parse_campaign(example() | {"trigger": trigger})
    assert raised.value.path == error_path


def test_message_and_messages_are_mutually_exclusive() -> None:
    doc = example() | {"messages": [{"message": example()["message"]}]}
    with pytest.raises(CampaignError) as raised:
        parse_campaign(doc)
    assert raised.value.path == "messages"
    without = example()
    del without["message"]
    with pytest.raises(CampaignError, match="exactly one of message or messages"):
        parse_campaign(without)
    with pytest.raises(CampaignError, match="non-empty list"):
        parse_campaign(without | {"messages": []})


def test_a_correlation_key_needs_an_action_trigger() -> None:
    doc = example() | {
        "trigger": {"threshold": "true"},
        "correlation_key": "cart_id",
    }
    with pytest.raises(CampaignError) as raised:
        parse_campaign(doc)
    assert raised.value.path == "correlation_key"


def test_a_campaign_must_be_a_mapping_with_string_keys() -> None:
    with pytest.raises(CampaignError):
        parse_campaign(["id"])  # type: ignore[arg-type]
    with pytest.raises(CampaignError, match="keys must be strings"):
        parse_campaign({**example(), True: "yes"})  # type: ignore[dict-item]


def test_expressions_are_listed_with_their_paths() -> None:
    campaign = parse_campaign(yaml.safe_load(ABANDONED_CART))
    assert [path for path, _ in campaign.expressions()] == [
        "trigger.where",
        "audience",
        "exceptions[0].match",
        "messages[0].when",
    ]
    assert campaign.referenced_event_names() == {"add_to_cart", "purchase"}
