"""The pure delivery policy: parsing, calendar windows in the user's zone (DST gaps and
overlaps), quiet-hour ends, consent, and who gets the last cap slot."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.dispatch.policy import (
    Contender,
    FrequencyCap,
    Period,
    PolicyError,
    QuietHours,
    Recipient,
    Reservation,
    Verdict,
    WorkspacePolicy,
    competition_key,
    consent_refusal,
    decide_claims,
    local_instants,
    normalize_address,
    parse_policy,
    quiet_hours_end,
    undeliverable_refusal,
    user_zone,
    window_start,
)

BERLIN = ZoneInfo("Europe/Berlin")
UTC_ZONE = ZoneInfo("UTC")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# ------------------------------------------------------------------------------------ parsing


def test_the_issue_example_parses_and_normalizes() -> None:
    policy = parse_policy(
        {
            "default_timezone": "UTC",
            "frequency_caps": [
                {"channel": "any", "max": 3, "per": "1d"},
                {"channel": "push", "max": 1, "per": "1h"},
            ],
            "quiet_hours": {"start": "22:00", "end": "08:00", "channels": ["push", "sms"]},
        }
    )
    assert policy.frequency_caps == (
        FrequencyCap("any", 3, Period(1, "d")),
        FrequencyCap("push", 1, Period(1, "h")),
    )
    assert policy.quiet_hours == QuietHours(time(22), time(8), frozenset({"push", "sms"}))
    assert parse_policy(policy.to_dict()) == policy
    assert policy.to_dict()["quiet_hours"] == {
        "start": "22:00",
        "end": "08:00",
        "channels": ["push", "sms"],
    }


def test_an_empty_document_is_the_default_policy() -> None:
    assert parse_policy({}) == WorkspacePolicy()


@pytest.mark.parametrize(
    ("document", "path", "message"),
    [
        ({"default_timezone": "Mars/Olympus"}, "default_timezone", "unknown IANA time zone"),
        (
            {"frequency_caps": [{"channel": "fax", "max": 1, "per": "1d"}]},
            "frequency_caps[0].channel",
            "must be one of",
        ),
        (
            {"frequency_caps": [{"max": 1, "per": "1 day"}]},
            "frequency_caps[0].per",
            "count and a unit",
        ),
        ({"frequency_caps": [{"max": 1, "per": "400d"}]}, "frequency_caps[0].per", "at most 366d"),
        ({"frequency_caps": [{"max": -1, "per": "1d"}]}, "frequency_caps[0].max", "between 0"),
        ({"frequency_caps": [{"max": True, "per": "1d"}]}, "frequency_caps[0].max", "integer"),
        ({"frequency_caps": [{"max": 1}]}, "frequency_caps[0].per", "is required"),
        (
            {"frequency_caps": [{"max": 1, "per": "1d", "every": 2}]},
            "frequency_caps[0].every",
            "unknown field",
        ),
        ({"quiet_hours": {"start": "22:00"}}, "quiet_hours.end", "is required"),
        ({"quiet_hours": {"start": "25:00", "end": "08:00"}}, "quiet_hours.start", "HH:MM"),
        ({"quiet_hours": {"start": "08:00", "end": "08:00"}}, "quiet_hours.end", "differ"),
        (
            {"quiet_hours": {"start": "22:00", "end": "08:00", "channels": ["pager"]}},
            "quiet_hours.channels[0]",
            "must be one of",
        ),
        ({"require_opt_in": ["webhook"]}, "require_opt_in[0]", "must be one of"),
        ({"quiet": {}}, "quiet", "unknown field"),
    ],
)
def test_invalid_policies_name_the_field(document: object, path: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(document)
    assert caught.value.path == path
    assert message in caught.value.message


def test_quiet_hours_default_to_push_and_sms() -> None:
    policy = parse_policy({"quiet_hours": {"start": "21:30", "end": "07:15"}})
    assert policy.quiet_hours is not None
    assert policy.quiet_hours.channels == frozenset({"push", "sms"})


# ------------------------------------------------------------------------------- time zones


def test_a_local_time_in_the_spring_gap_resolves_to_the_end_of_the_gap() -> None:
    # Europe/Berlin 2026-03-29: 02:00 CET jumps to 03:00 CEST at 01:00 UTC.
    assert local_instants(datetime(2026, 3, 29).date(), time(2, 30), BERLIN) == [
        utc(2026, 3, 29, 1)
    ]


def test_a_local_time_in_the_autumn_overlap_has_two_instants() -> None:
    # 2026-10-25: 03:00 CEST falls back to 02:00 CET at 01:00 UTC; 02:30 happens twice.
    assert local_instants(datetime(2026, 10, 25).date(), time(2, 30), BERLIN) == [
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 25, 1, 30),
    ]


def test_a_day_whose_midnight_does_not_exist_starts_when_the_gap_ends() -> None:
    santiago = ZoneInfo("America/Santiago")  # 2026-09-06 00:00 -04 jumps to 01:00 -03
    assert local_instants(datetime(2026, 9, 6).date(), time(0), santiago) == [utc(2026, 9, 6, 4)]


@pytest.mark.parametrize(
    ("now", "period", "start"),
    [
        # the 23-hour day: Sunday starts 23:00 UTC Saturday (CET), ends 22:00 UTC (CEST)
        (utc(2026, 3, 29, 21, 59), Period(1, "d"), utc(2026, 3, 28, 23)),
        (utc(2026, 3, 29, 22, 0), Period(1, "d"), utc(2026, 3, 29, 22)),
        # the 25-hour day
        (utc(2026, 10, 25, 22, 59), Period(1, "d"), utc(2026, 10, 24, 22)),
        (utc(2026, 10, 25, 23, 0), Period(1, "d"), utc(2026, 10, 25, 23)),
        # several days: today and the day before
        (utc(2026, 3, 30, 10), Period(2, "d"), utc(2026, 3, 28, 23)),
        # weeks start on Monday, local midnight
        (utc(2026, 4, 1, 12), Period(1, "w"), utc(2026, 3, 29, 22)),
        # the repeated hour 02:00-03:00 is two separate clock hours
        (utc(2026, 10, 25, 0, 45), Period(1, "h"), utc(2026, 10, 25, 0)),
        (utc(2026, 10, 25, 1, 45), Period(1, "h"), utc(2026, 10, 25, 1)),
        (utc(2026, 10, 25, 1, 45), Period(3, "h"), utc(2026, 10, 24, 23)),
        (utc(2026, 10, 25, 1, 45, 30), Period(15, "m"), utc(2026, 10, 25, 1, 31)),
    ],
)
def test_cap_windows_are_calendar_windows_in_the_users_zone(
    now: datetime, period: Period, start: datetime
) -> None:
    assert window_start(now, BERLIN, period) == start


@pytest.mark.parametrize(
    "zone_name",
    ["Europe/Berlin", "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata", "Pacific/Apia"],
)
def test_every_window_contains_now_and_is_no_longer_than_its_period(zone_name: str) -> None:
    tz = ZoneInfo(zone_name)
    now = utc(2026, 1, 1)
    while now < utc(2027, 1, 1):
        for period, longest in (
            (Period(1, "d"), timedelta(hours=26)),
            (Period(1, "h"), timedelta(hours=1)),
        ):
            start = window_start(now, tz, period)
            assert start <= now < start + longest, (zone_name, now, period)
        day_start = window_start(now, tz, Period(1, "d"))
        assert day_start.astimezone(tz).date() == now.astimezone(tz).date()
        now += timedelta(hours=7, minutes=13)


def test_user_zone_falls_back_from_an_invalid_trait_to_the_workspace_default() -> None:
    assert user_zone("Europe/Paris", "UTC").key == "Europe/Paris"
    assert user_zone("Not/AZone", "Asia/Tokyo").key == "Asia/Tokyo"
    assert user_zone(None, "Nope").key == "UTC"


# ------------------------------------------------------------------------------- quiet hours

NIGHT = QuietHours(time(22), time(8), frozenset({"push"}))


@pytest.mark.parametrize(
    ("now", "end"),
    [
        (utc(2026, 6, 1, 19, 59), None),  # 21:59 CEST
        (utc(2026, 6, 1, 20, 0), utc(2026, 6, 2, 6)),  # 22:00 -> 08:00 next morning
        (utc(2026, 6, 2, 3, 0), utc(2026, 6, 2, 6)),  # 05:00 -> 08:00 today
        (utc(2026, 6, 2, 6, 0), None),  # 08:00: over
        # the night the clocks go forward: 08:00 CEST is 06:00 UTC, not 07:00
        (utc(2026, 3, 28, 22, 0), utc(2026, 3, 29, 6)),
        # the night they go back: 08:00 CET is 07:00 UTC
        (utc(2026, 10, 24, 21, 0), utc(2026, 10, 25, 7)),
    ],
)
def test_quiet_hours_end_at_the_local_end_time(now: datetime, end: datetime | None) -> None:
    assert quiet_hours_end(now, BERLIN, NIGHT) == end


def test_a_quiet_window_ending_inside_the_repeated_hour_ends_at_the_next_occurrence() -> None:
    quiet = QuietHours(time(22), time(2, 30), frozenset({"push"}))
    assert quiet_hours_end(utc(2026, 10, 24, 23, 0), BERLIN, quiet) == utc(2026, 10, 25, 0, 30)
    # 02:10 the second time round (CET) is inside 22:00-02:30 again, until the second 02:30
    assert quiet_hours_end(utc(2026, 10, 25, 1, 10), BERLIN, quiet) == utc(2026, 10, 25, 1, 30)


def test_a_quiet_window_ending_inside_the_spring_gap_ends_when_the_gap_does() -> None:
    quiet = QuietHours(time(23), time(2, 30), frozenset({"push"}))
    assert quiet_hours_end(utc(2026, 3, 28, 23, 30), BERLIN, quiet) == utc(2026, 3, 29, 1)


def test_a_daytime_window_does_not_wrap() -> None:
    lunch = QuietHours(time(12), time(14), frozenset({"sms"}))
    assert quiet_hours_end(utc(2026, 6, 1, 11), UTC_ZONE, lunch) is None
    assert quiet_hours_end(utc(2026, 6, 1, 12), UTC_ZONE, lunch) == utc(2026, 6, 1, 14)
    assert quiet_hours_end(utc(2026, 6, 1, 23), UTC_ZONE, lunch) is None


# ----------------------------------------------------------------------------------- consent


def test_consent_follows_the_braze_convention() -> None:
    policy = WorkspacePolicy()
    assert consent_refusal("email", "marketing", Recipient(), policy) is None
    unsubscribed = Recipient({"email": "unsubscribed"})
    refusal = consent_refusal("email", "marketing", unsubscribed, policy)
    assert refusal is not None
    assert refusal[0] == "unsubscribed"
    assert consent_refusal("email", "transactional", unsubscribed, policy) is None
    assert consent_refusal("push", "marketing", unsubscribed, policy) is None
    assert (
        consent_refusal("webhook", "marketing", Recipient({"webhook": "unsubscribed"}), policy)
        is None
    )


def test_require_opt_in_accepts_only_opted_in() -> None:
    policy = WorkspacePolicy(require_opt_in=frozenset({"sms"}))
    refusal = consent_refusal("sms", "marketing", Recipient({"sms": "subscribed"}), policy)
    assert refusal is not None
    assert refusal[0] == "not_opted_in"
    assert consent_refusal("sms", "marketing", Recipient({"sms": "opted_in"}), policy) is None


def test_undeliverable_addresses_compare_by_mailbox() -> None:
    recipient = Recipient(undeliverable={"email": frozenset({"ann@example.test"})})
    assert normalize_address("email", "Ann <ANN@Example.test>") == "ann@example.test"
    assert undeliverable_refusal("email", "Ann <Ann@example.test>", recipient) is not None
    assert undeliverable_refusal("email", "bob@example.test", recipient) is None
    assert undeliverable_refusal("push", "ann@example.test", recipient) is None


# ------------------------------------------------------------------------------ competition

T0 = utc(2026, 6, 1, 9)


def contender(
    send_id: str,
    priority: int = 0,
    minutes: int = 0,
    *,
    channel: str = "email",
    kind: str = "marketing",
    holds: bool = False,
) -> Contender:
    return Contender(send_id, channel, kind, priority, T0 + timedelta(minutes=minutes), holds)


def test_competition_order_is_priority_then_decided_at_then_send_id() -> None:
    contenders = [
        contender("d", 0, 0),
        contender("c", 1, 5),
        contender("b", 1, 1),
        contender("a", 1, 1),
    ]
    assert [c.send_id for c in sorted(contenders, key=competition_key)] == ["a", "b", "c", "d"]


def test_the_last_slot_goes_to_the_first_in_competition_order() -> None:
    policy = WorkspacePolicy(frequency_caps=(FrequencyCap("any", 3, Period(1, "d")),))
    used = [Reservation("webhook", T0 - timedelta(hours=1))]
    decisions = decide_claims(
        [contender("low", 0), contender("high", 9, 30), contender("mid", 5)],
        recipient=Recipient(),
        policy=policy,
        reservations=used,
        now=T0,
        tz=UTC_ZONE,
    )
    verdicts = {d.send_id: d.verdict for d in decisions}
    assert verdicts == {"high": Verdict.ATTEMPT, "mid": Verdict.ATTEMPT, "low": Verdict.SUPPRESS}
    assert [d.send_id for d in decisions] == ["high", "mid", "low"]
    assert all(d.reserve_cap for d in decisions if d.verdict is Verdict.ATTEMPT)


def test_reservations_outside_the_window_do_not_count() -> None:
    policy = WorkspacePolicy(frequency_caps=(FrequencyCap("email", 1, Period(1, "d")),))
    yesterday = [Reservation("email", T0 - timedelta(hours=10))]
    [decision] = decide_claims(
        [contender("x")],
        recipient=Recipient(),
        policy=policy,
        reservations=yesterday,
        now=T0,
        tz=UTC_ZONE,
    )
    assert decision.verdict is Verdict.ATTEMPT


def test_a_send_that_holds_a_slot_is_not_capped_again() -> None:
    policy = WorkspacePolicy(frequency_caps=(FrequencyCap("any", 1, Period(1, "d")),))
    [decision] = decide_claims(
        [contender("retry", holds=True)],
        recipient=Recipient(),
        policy=policy,
        reservations=[Reservation("email", T0)],
        now=T0,
        tz=UTC_ZONE,
    )
    assert decision.verdict is Verdict.ATTEMPT
    assert decision.reserve_cap is False


def test_quiet_hours_hold_and_consent_suppress_before_caps() -> None:
    policy = WorkspacePolicy(
        frequency_caps=(FrequencyCap("any", 0, Period(1, "d")),),
        quiet_hours=QuietHours(time(8), time(10), frozenset({"push"})),
    )
    decisions = decide_claims(
        [
            contender("push", channel="push"),
            contender("mail"),
            contender("tx", kind="transactional"),
        ],
        recipient=Recipient({"email": "unsubscribed"}),
        policy=policy,
        reservations=[],
        now=T0,
        tz=UTC_ZONE,
    )
    by_id = {d.send_id: d for d in decisions}
    assert by_id["push"].verdict is Verdict.HOLD
    assert by_id["push"].next_at == utc(2026, 6, 1, 10)
    assert (by_id["mail"].verdict, by_id["mail"].code) == (Verdict.SUPPRESS, "unsubscribed")
    assert (by_id["tx"].verdict, by_id["tx"].reserve_cap) == (Verdict.ATTEMPT, False)
