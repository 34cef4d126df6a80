"""Ingest's pure validation (services/ingest/domain.py): hard limits, text, timestamps, rates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.ingest.domain import (
    MAX_ID_CHARS,
    MAX_PROPERTIES_BYTES,
    EventRejectedError,
    TokenBucket,
    ValidEvent,
    validate_event,
)

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
FIELD = "events[3]"


def validate(**overrides: Any) -> ValidEvent:
    fields: dict[str, Any] = {
        "event_id": "evt-1",
        "user_id": "user-1",
        "name": "order_shipped",
        "occurred_at": None,
        "properties": {},
        "context": {},
        "now": NOW,
        "field": FIELD,
    }
    return validate_event(**(fields | overrides))


def rejection(**overrides: Any) -> EventRejectedError:
    with pytest.raises(EventRejectedError) as caught:
        validate(**overrides)
    return caught.value


def nested_objects(levels: int) -> dict[str, Any]:
    """`levels` objects nested in each other; the innermost is empty."""
    document: dict[str, Any] = {}
    for _ in range(levels - 1):
        document = {"a": document}
    return document


# --- identifiers ------------------------------------------------------------------------------


def test_ids_are_nfc_normalized_so_equivalent_spellings_dedupe() -> None:
    decomposed = "cafe\u0301"  # e + combining acute accent
    event = validate(event_id=decomposed, user_id=f" {decomposed} ")

    assert event.event_id == "caf\u00e9"
    assert event.user_id == "caf\u00e9"
    assert validate(event_id="caf\u00e9").event_id == event.event_id


@pytest.mark.parametrize("blank", ["", "   "])
def test_an_empty_event_id_is_rejected_as_required(blank: str) -> None:
    error = rejection(event_id=blank)

    assert error.field == "events[3].event_id"
    assert error.reason == "is required"


def test_an_event_id_longer_than_128_characters_is_rejected() -> None:
    assert validate(event_id="x" * MAX_ID_CHARS).event_id == "x" * MAX_ID_CHARS
    error = rejection(event_id="x" * (MAX_ID_CHARS + 1))

    assert error.field == "events[3].event_id"
    assert "longer than 128" in error.reason


def test_the_id_length_limit_counts_characters_after_normalization() -> None:
    decomposed = "e\u0301" * MAX_ID_CHARS  # 256 code points, 128 after NFC

    assert len(validate(event_id=decomposed).event_id) == MAX_ID_CHARS


def test_a_user_id_of_ten_thousand_characters_is_rejected() -> None:
    assert rejection(user_id="u" * 10_000).field == "events[3].user_id"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event_id", "evt\x00"),
        ("event_id", "evt\n2"),
        ("user_id", "user\x7f"),
        ("user_id", "\u202euser"),  # right-to-left override
        ("user_id", "user\u2066x"),  # left-to-right isolate
        ("name", "\ufefforder_shipped"),  # byte order mark
    ],
)
def test_control_and_bidi_override_characters_are_rejected_with_the_field_path(
    field: str, value: str
) -> None:
    error = rejection(**{field: value})

    assert error.field == f"events[3].{field}"
    assert "control or bidirectional-override" in error.reason


def test_a_lone_surrogate_in_an_id_is_rejected_before_it_reaches_the_database() -> None:
    error = rejection(user_id="user\ud800")

    assert error.field == "events[3].user_id"


# --- event names ------------------------------------------------------------------------------


def test_names_starting_with_a_dollar_are_reserved() -> None:
    error = rejection(name="$identify")

    assert error.field == "events[3].name"
    assert "reserved" in error.reason


def test_a_reserved_name_is_accepted_where_the_caller_allows_it() -> None:
    assert validate(name="$identify", allow_reserved_name=True).name == "$identify"


def test_a_name_with_characters_outside_the_allowed_set_is_rejected() -> None:
    assert rejection(name="order/shipped").field == "events[3].name"
    assert validate(name="Order shipped: v2.1-beta_x").name == "Order shipped: v2.1-beta_x"


# --- property documents -----------------------------------------------------------------------


def test_a_nul_character_in_a_property_value_is_rejected_with_its_path() -> None:
    error = rejection(properties={"note": {"text": "a\x00b"}})

    assert error.field == "events[3].properties.note.text"
    assert "NUL" in error.reason


def test_a_nul_character_in_a_property_key_is_rejected() -> None:
    assert rejection(properties={"a\x00b": 1}).field == "events[3].properties.a\x00b"


def test_a_lone_surrogate_in_a_property_value_is_rejected() -> None:
    error = rejection(properties={"items": ["ok", "bad\udc80"]})

    assert error.field == "events[3].properties.items[1]"
    assert "surrogate" in error.reason


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_rejected(number: float) -> None:
    error = rejection(properties={"price": {"amount": number}})

    assert error.field == "events[3].properties.price.amount"
    assert "finite" in error.reason


def test_non_finite_numbers_in_the_context_are_rejected_too() -> None:
    assert rejection(context={"ratio": float("nan")}).field == "events[3].context.ratio"


def test_properties_nested_eight_objects_deep_are_accepted_and_nine_are_rejected() -> None:
    assert validate(properties=nested_objects(8)).properties == nested_objects(8)

    error = rejection(properties=nested_objects(9))

    assert error.field == "events[3].properties" + ".a" * 8
    assert "deeper than 8" in error.reason


def test_lists_count_towards_the_nesting_depth() -> None:
    deep: Any = []
    for _ in range(8):
        deep = [deep]

    assert rejection(properties={"x": deep}).field.startswith("events[3].properties.x[0]")


def test_properties_up_to_32_kib_are_accepted_and_one_byte_more_is_rejected() -> None:
    overhead = len('{"blob":""}')
    at_limit = {"blob": "x" * (MAX_PROPERTIES_BYTES - overhead)}

    assert validate(properties=at_limit).properties == at_limit
    error = rejection(properties={"blob": "x" * (MAX_PROPERTIES_BYTES - overhead + 1)})
    assert error.field == "events[3].properties"
    assert "32768" in error.reason


def test_the_properties_limit_counts_utf8_bytes_not_characters() -> None:
    two_byte_chars = {"blob": "\u00e9" * (MAX_PROPERTIES_BYTES // 2)}

    assert rejection(properties=two_byte_chars).field == "events[3].properties"


def test_valid_properties_are_kept_as_given() -> None:
    properties = {"total": 42.5, "items": [{"sku": "A", "qty": 2}], "gift": False, "note": None}

    assert validate(properties=properties).properties == properties


# --- timestamps -------------------------------------------------------------------------------


def test_occurred_at_more_than_30_days_in_the_past_is_rejected() -> None:
    assert validate(occurred_at=NOW - timedelta(days=30)).occurred_at == NOW - timedelta(days=30)
    error = rejection(occurred_at=NOW - timedelta(days=30, seconds=1))

    assert error.field == "events[3].occurred_at"
    assert "30 days in the past" in error.reason


def test_occurred_at_more_than_5_minutes_in_the_future_is_rejected() -> None:
    assert validate(occurred_at=NOW + timedelta(minutes=5)).occurred_at is not None
    error = rejection(occurred_at=NOW + timedelta(minutes=5, seconds=1))

    assert error.field == "events[3].occurred_at"
    assert "5 minutes in the future" in error.reason


def test_epoch_and_far_future_timestamps_are_rejected() -> None:
    assert rejection(occurred_at=datetime(1970, 1, 1, tzinfo=UTC)).field.endswith("occurred_at")
    assert rejection(occurred_at=datetime(2100, 1, 1, tzinfo=UTC)).field.endswith("occurred_at")


def test_a_missing_occurred_at_stays_missing_for_the_store_to_fill() -> None:
    assert validate(occurred_at=None).occurred_at is None


# --- rate limiting ----------------------------------------------------------------------------


def test_a_token_bucket_allows_its_burst_then_refuses() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5)

    assert bucket.take(5, now=0.0)
    assert not bucket.take(1, now=0.0)
    assert bucket.wait_s(1) == pytest.approx(0.1)


def test_a_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5)
    bucket.take(5, now=0.0)

    assert not bucket.take(2, now=0.1)  # one token back, two asked
    assert bucket.take(2, now=0.2)
    assert not bucket.take(1, now=0.2)


def test_a_token_bucket_never_refills_beyond_its_burst() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=5)
    bucket.take(5, now=0.0)

    assert not bucket.take(6, now=1_000.0)
    assert bucket.take(5, now=1_000.0)
    assert not bucket.take(1, now=1_000.0)
