from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from services.rules.cel import (
    CelCompileError,
    CelEvaluationError,
    activation,
    compile_campaign,
    compile_expression,
    json_numbers_as_double,
    referenced_event_names,
    referenced_sum_properties,
)
from services.rules.domain import CampaignError, parse_campaign

EVENT_USER = ("event", "user")


def where(source: str, **properties: Any) -> bool:
    expression = compile_expression(source, EVENT_USER)
    return expression.evaluate_bool({"event": {"properties": properties}, "user": {}})


@pytest.mark.parametrize(
    ("total", "expected"), [(25, True), (25.0, True), (20, False), (20.0, False)]
)
def test_total_greater_than_20_works_for_int_and_double_totals(
    total: float, expected: bool
) -> None:
    assert where("event.properties.total > 20", total=total) is expected
    assert where("event.properties.total > 20.0", total=total) is expected


def test_int_and_double_compare_equal_at_run_time() -> None:
    assert where("event.properties.total == 20", total=20.0)
    assert where("event.properties.total in [1, 20]", total=20.0)


def test_mixing_int_and_double_literals_is_a_compile_error() -> None:
    with pytest.raises(CelCompileError, match="no matching overload"):
        compile_expression("20 > 10.5", EVENT_USER)
    assert compile_expression("20.0 > 10.5", EVENT_USER).evaluate({}) is True


def test_mixed_arithmetic_fails_so_numbers_are_passed_as_doubles() -> None:
    plus_one = compile_expression("event.properties.total + 1.0 > 20.0", EVENT_USER)
    with pytest.raises(CelEvaluationError, match="No matching overloads"):
        plus_one.evaluate_bool({"event": {"properties": {"total": 20}}, "user": {}})
    normalized = json_numbers_as_double({"properties": {"total": 20}})
    assert plus_one.evaluate_bool({"event": normalized, "user": {}}) is True


def test_json_numbers_as_double_converts_ints_only_and_keeps_unchanged_objects() -> None:
    value = {"a": 1, "b": True, "c": [1, 2.5, {"d": 3}], "e": "x", "f": None, "g": (1,)}
    assert json_numbers_as_double(value) == {
        "a": 1.0,
        "b": True,
        "c": [1.0, 2.5, {"d": 3.0}],
        "e": "x",
        "f": None,
        "g": [1.0],
    }
    untouched = {"a": 1.5, "b": ["x", {"c": False}]}
    assert json_numbers_as_double(untouched) is untouched
    assert json_numbers_as_double(10**400) == float("inf")


def test_a_missing_property_is_an_evaluation_error_not_false() -> None:
    with pytest.raises(CelEvaluationError) as raised:
        where("event.properties.total > 20", other=1)
    assert "Key not found" in raised.value.message
    assert raised.value.source == "event.properties.total > 20"


def test_has_and_in_test_for_a_property_without_error() -> None:
    assert where("has(event.properties.total) && event.properties.total > 20", other=1) is False
    assert where("!('total' in event.properties)", other=1) is True
    assert where("false && event.properties.missing > 1", other=1) is False
    assert where("event.properties.missing > 1 || true", other=1) is True


def test_null_is_cel_null_and_cannot_be_ordered() -> None:
    assert where("event.properties.total == null", total=None) is True
    with pytest.raises(CelEvaluationError):
        where("event.properties.total > 20", total=None)


def test_a_non_bool_predicate_result_is_an_evaluation_error() -> None:
    with pytest.raises(CelEvaluationError, match="expected a bool"):
        where("event.properties.total", total=3)


def test_evaluate_returns_plain_python_values() -> None:
    expression = compile_expression("{'a': [1, 2.5, 'x', null], 'b': user.n + 1}", ("user",))
    assert expression.evaluate({"user": {"n": 1}}) == {"a": [1, 2.5, "x", None], "b": 2}


def test_syntax_errors_and_undeclared_variables_are_compile_errors() -> None:
    with pytest.raises(CelCompileError) as raised:
        compile_expression("event.properties.total >", EVENT_USER)
    assert "Syntax error" in raised.value.message
    assert not raised.value.message.startswith("INVALID_ARGUMENT")
    with pytest.raises(CelCompileError, match="undeclared reference"):
        compile_expression("trigger.properties.x == 1", EVENT_USER)
    with pytest.raises(CelCompileError):
        compile_expression("", EVENT_USER)
    with pytest.raises(CelCompileError, match="longer than"):
        compile_expression("true && " * 600 + "true", EVENT_USER)


def test_compiled_expressions_are_cached_by_source_and_variables() -> None:
    first = compile_expression("user.a == 1", ["user", "event"])
    assert compile_expression("user.a == 1", ["event", "user"]) is first
    assert compile_expression("user.a == 1", ["user"]) is not first
    assert first.references == {"user"}
    assert first.return_type == "bool"


def test_timestamps_travel_as_iso_strings_and_datetimes_are_refused() -> None:
    expression = compile_expression(
        "timestamp(user.last_seen) > timestamp('2026-01-01T00:00:00Z')", ("user",)
    )
    assert expression.evaluate_bool({"user": {"last_seen": "2026-03-01T12:00:00+00:00"}})
    with pytest.raises(CelEvaluationError, match="Non-CEL value"):
        expression.evaluate_bool({"user": {"last_seen": datetime(2026, 3, 1, tzinfo=UTC)}})


def test_bad_input_values_become_evaluation_errors() -> None:
    expression = compile_expression("user.name == 'x'", ("user",))
    with pytest.raises(CelEvaluationError):
        expression.evaluate_bool({"user": {"name": "\ud800"}})
    with pytest.raises(CelEvaluationError):
        expression.evaluate_bool({"user": {"name": ("x",)}})


def test_one_activation_serves_expressions_with_different_variables() -> None:
    shared = activation({"event": {"properties": {"total": 25.0}}, "user": {"country": "DE"}})
    assert compile_expression("event.properties.total > 20", EVENT_USER).evaluate_bool(shared)
    assert compile_expression("user.country == 'DE'", ("user",)).evaluate_bool(shared)


ABANDONED_CART = """
id: abandoned-cart
trigger: {event: add_to_cart, where: "event.properties.value >= 10.0"}
audience: "user.traits.country == 'DE' && user.events['session_start'].last_7d.count >= 1"
delay: 1h
correlation_key: cart_id
exceptions:
  - event: purchase
    match: "exception.properties.cart_id == trigger.properties.cart_id"
messages:
  - when: "user.events['feature_x_used'].count == 0"
    message:
      channel: email
      to: "{{ user.traits.email }}"
      subject: "A"
      body: "{{ user.events.purchase.sum.amount }}"
  - message: {channel: email, to: "{{ user.traits.email }}", subject: "B", body: "b"}
"""


def cart() -> dict[str, Any]:
    doc = yaml.safe_load(ABANDONED_CART)
    assert isinstance(doc, dict)
    return doc


def test_a_campaign_compiles_every_expression_once() -> None:
    compiled = compile_campaign(parse_campaign(cart()), version=3)
    assert compiled.version == 3
    assert compiled.where is not None
    assert compiled.audience is not None
    assert compiled.threshold is None
    assert compiled.exception_matches[0] is not None
    assert compiled.branch_conditions[0] is not None
    assert compiled.branch_conditions[1] is None
    assert compiled.referenced_event_names == frozenset(
        {"session_start", "feature_x_used", "purchase"}
    )
    assert compiled.sum_properties == {"amount"}


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("trigger.where", "event.properties.value >="),
        ("trigger.where", "exception.properties.x == 1"),
        ("audience", "event.properties.x == 1"),
        ("exceptions[0].match", "exception.properties.cart_id =="),
        ("messages[0].when", "user.events['x'].count == 0 &&"),
        ("messages[0].when", "user.events['x'].count + 1"),
    ],
)
def test_compile_errors_are_campaign_errors_with_the_expression_path(
    path: str, source: str
) -> None:
    doc = cart()
    if path == "trigger.where":
        doc["trigger"]["where"] = source
    elif path == "audience":
        doc["audience"] = source
    elif path.startswith("exceptions"):
        doc["exceptions"][0]["match"] = source
    else:
        doc["messages"][0]["when"] = source
    definition = parse_campaign(doc)
    with pytest.raises(CampaignError) as raised:
        compile_campaign(definition)
    assert raised.value.path == path


def test_a_threshold_compiles_against_user_only() -> None:
    doc = cart() | {"trigger": {"threshold": "user.events['purchase'].count >= 1"}}
    del doc["correlation_key"]
    compiled = compile_campaign(parse_campaign(doc))
    assert compiled.threshold is not None
    doc["trigger"] = {"threshold": "event.name == 'x'"}
    with pytest.raises(CampaignError) as raised:
        compile_campaign(parse_campaign(doc))
    assert raised.value.path == "trigger.threshold"


def test_a_predicate_with_a_non_bool_static_type_is_rejected_at_apply_time() -> None:
    doc = cart() | {"audience": "1 + 2"}
    with pytest.raises(CampaignError, match="boolean") as raised:
        compile_campaign(parse_campaign(doc))
    assert raised.value.path == "audience"


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["user.events['a'].count > 1 && user.events[\"b c\"].last_7d.count == 0"], {"a", "b c"}),
        (["user.events.a.count > 1", "user.traits.x == 1"], {"a"}),
        (["event.properties.user == 'x'", "has(user.events.a)"], {"a"}),
        (["user.events.exists(k, k == 'a')"], None),
        (["user.events[event.name].count > 1"], None),
        (["user['events']['a'].count > 1"], None),
        (["size(user) > 1"], None),
        (["event.properties.total > 20"], set()),
    ],
)
def test_referenced_event_names_are_found_or_all_are_needed(
    texts: list[str], expected: set[str] | None
) -> None:
    assert referenced_event_names(texts) == expected


def test_referenced_sum_properties_are_found() -> None:
    texts = ["user.events['p'].last_30d.sum['amount'] >= 5.0", "user.events.p.sum.total > 1.0"]
    assert referenced_sum_properties(texts) == {"amount", "total"}


def test_template_text_outside_liquid_tags_is_not_a_reference() -> None:
    doc = cart()
    doc["messages"][1]["message"]["body"] = "Dear user, {{ user.traits.first_name }}"
    compiled = compile_campaign(parse_campaign(doc))
    assert compiled.referenced_event_names == frozenset(
        {"session_start", "feature_x_used", "purchase"}
    )
