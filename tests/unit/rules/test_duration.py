from datetime import timedelta

import pytest

from services.rules.domain import MAX_DURATION, DurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0s", timedelta(0)),
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("14d", timedelta(days=14)),
        ("3650d", MAX_DURATION),
    ],
)
def test_durations_with_one_unit_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "1", "1w", "-1h", "1.5h", "1h30m", " 1h", "1H", "h", "3651d", "1d "]
)
def test_malformed_or_too_long_durations_are_rejected(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


@pytest.mark.parametrize("value", [0, 1.5, None, ["1h"]])
def test_a_duration_must_be_a_string(value: object) -> None:
    with pytest.raises(DurationError, match="duration string"):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=90), "90s"),
        (timedelta(minutes=60), "1h"),
        (timedelta(hours=48), "2d"),
        (timedelta(minutes=90), "90m"),
    ],
)
def test_durations_format_with_the_largest_exact_unit(value: timedelta, text: str) -> None:
    assert format_duration(value) == text
    assert parse_duration(text) == value


def test_sub_second_durations_have_no_text() -> None:
    with pytest.raises(DurationError):
        format_duration(timedelta(milliseconds=1500))
