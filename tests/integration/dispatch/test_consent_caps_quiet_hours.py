"""Consent, frequency caps and quiet hours, decided at claim time under the user's lock, with
time skipping across the Europe/Berlin DST change (last Sunday of March 2026: 01:00 UTC)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from nudge.testing.sinks import SmtpFault
from tests.integration.dispatch.conftest import Rig

BERLIN_DAILY_EMAIL_CAP = {
    "default_timezone": "Europe/Berlin",
    "frequency_caps": [{"channel": "email", "max": 1, "per": "1d"}],
}


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


async def test_an_unsubscribe_accepted_while_a_message_is_pending_suppresses_it(rig: Rig) -> None:
    rig.smtp.faults.append(SmtpFault("mail", "421 4.3.2 Busy"))
    request = rig.request()
    await rig.dispatcher.accept(request)
    assert (await rig.send(request.send_id))["state"] == "retry_wait"

    await rig.identify("ann", {"email_subscribe": "unsubscribed"})  # acknowledged here
    await rig.run_until_settled(timedelta(seconds=2))

    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"]) == ("suppressed", 1)
    assert "unsubscribed" in row["reason"]
    assert row["cap_reserved_at"] is None
    [event] = await rig.events("message.suppressed")
    assert event["properties"]["code"] == "unsubscribed"
    assert event["properties"]["send_id"] == request.send_id
    assert rig.smtp.messages == []


async def test_an_unsubscribe_suppresses_a_send_recorded_but_not_yet_claimed(rig: Rig) -> None:
    request = rig.request()
    await rig.dispatcher.record(request)
    await rig.identify("ann", {"email_subscribe": "unsubscribed", "first_name": "Ann"})
    await rig.dispatcher.attempt(request.send_id)
    assert (await rig.send(request.send_id))["state"] == "suppressed"
    assert rig.smtp.messages == []


@pytest.mark.parametrize(
    ("identifies", "expected"),
    [
        ([], "sent"),  # never set: subscribed (Braze's default)
        ([{"email_subscribe": "subscribed"}], "sent"),
        ([{"email_subscribe": "opted_in"}], "sent"),
        ([{"email_subscribe": "UNSUBSCRIBED"}], "suppressed"),
        ([{"email_subscribe": False}], "suppressed"),
        ([{"email_subscribe": "maybe"}], "suppressed"),  # unclear intent: fail safe
        ([{"email_subscribe": "unsubscribed"}, {"email_subscribe": None}], "sent"),  # deleted
        ([{"email_subscribe": "unsubscribed"}, {"first_name": "Ann"}], "suppressed"),  # kept
        ([{"push_subscribe": "unsubscribed"}], "sent"),  # another channel
    ],
)
async def test_subscription_states(
    rig: Rig, identifies: list[dict[str, object]], expected: str
) -> None:
    for traits in identifies:
        await rig.identify("ann", traits)
    request = rig.request()
    await rig.dispatcher.accept(request)
    assert (await rig.send(request.send_id))["state"] == expected


async def test_require_opt_in_sends_only_to_opted_in_users(rig: Rig) -> None:
    await rig.apply_policy({"require_opt_in": ["email"]})
    never_set, subscribed = rig.request(user="a"), rig.request(user="b")
    await rig.identify("b", {"email_subscribe": "subscribed"})
    await rig.identify("c", {"email_subscribe": "opted_in"})
    opted_in = rig.request(user="c")
    for request in (never_set, subscribed, opted_in):
        await rig.dispatcher.accept(request)
    states = [(await rig.send(r.send_id))["state"] for r in (never_set, subscribed, opted_in)]
    assert states == ["suppressed", "suppressed", "sent"]


async def test_transactional_ignores_unsubscribes_caps_and_quiet_hours(rig: Rig) -> None:
    await rig.apply_policy(
        {
            "frequency_caps": [{"channel": "any", "max": 0, "per": "1d"}],
            "quiet_hours": {"start": "00:00", "end": "23:59", "channels": ["email"]},
        }
    )
    await rig.set_time(utc(2026, 5, 4, 12, 0))
    await rig.identify("ann", {"email_subscribe": "unsubscribed"})
    marketing, transactional = rig.request(), rig.request(kind="transactional")
    await rig.dispatcher.accept(marketing)
    await rig.dispatcher.accept(transactional)

    assert (await rig.send(marketing.send_id))["state"] == "suppressed"
    row = await rig.send(transactional.send_id)
    assert row["state"] == "sent"
    assert row["cap_reserved_at"] is None  # transactional sends take no cap slot
    assert len(rig.smtp.messages) == 1


async def test_daily_cap_follows_the_users_calendar_across_the_dst_change(rig: Rig) -> None:
    await rig.apply_policy(BERLIN_DAILY_EMAIL_CAP)
    outcomes = []
    # Sat 23:30 CET | Sun 00:30 CET: a new day | Sun 23:30 CEST: the same (23-hour) day |
    # Mon 00:05 CEST: a new day, though a fixed +01:00 would still say Sunday 23:05
    for when in (
        utc(2026, 3, 28, 22, 30),
        utc(2026, 3, 28, 23, 30),
        utc(2026, 3, 29, 21, 30),
        utc(2026, 3, 29, 22, 5),
    ):
        await rig.set_time(when)
        request = rig.request()
        await rig.dispatcher.accept(request)
        row = await rig.send(request.send_id)
        outcomes.append((row["state"], row["reason"]))

    assert [state for state, _ in outcomes] == ["sent", "sent", "suppressed", "sent"]
    assert outcomes[2][1] == "frequency cap: at most 1 email messages per day (Europe/Berlin)"
    [event] = await rig.events("message.suppressed")
    assert event["properties"]["code"] == "frequency_cap"


async def test_user_timezone_trait_overrides_the_workspace_default(rig: Rig) -> None:
    await rig.apply_policy(BERLIN_DAILY_EMAIL_CAP)
    await rig.identify("ann", {"timezone": "America/New_York"})
    states = []
    # 20:00 and 23:30 New York time on the same local day, then 00:30 the next day.
    for when in (utc(2026, 3, 30, 0, 0), utc(2026, 3, 30, 3, 30), utc(2026, 3, 30, 4, 30)):
        await rig.set_time(when)
        request = rig.request()
        await rig.dispatcher.accept(request)
        states.append((await rig.send(request.send_id))["state"])
    assert states == ["sent", "suppressed", "sent"]


async def test_hourly_cap_counts_every_channel_for_any(rig: Rig) -> None:
    await rig.apply_policy({"frequency_caps": [{"channel": "any", "max": 2, "per": "1h"}]})
    await rig.set_time(utc(2026, 6, 1, 10, 5))
    requests = [rig.request(), rig.request(channel="webhook"), rig.request()]
    for request in requests:
        await rig.dispatcher.accept(request)
    await rig.set_time(utc(2026, 6, 1, 11, 0))
    later = rig.request()
    await rig.dispatcher.accept(later)
    states = [(await rig.send(r.send_id))["state"] for r in [*requests, later]]
    assert states == ["sent", "sent", "suppressed", "sent"]


async def test_quiet_hours_hold_until_the_local_end_across_the_dst_change(rig: Rig) -> None:
    await rig.apply_policy(
        {
            "default_timezone": "Europe/Berlin",
            "quiet_hours": {"start": "22:00", "end": "08:00", "channels": ["email"]},
        }
    )
    await rig.set_time(utc(2026, 3, 28, 22, 0))  # Sat 23:00 CET
    held, webhook = rig.request(), rig.request(channel="webhook")
    await rig.dispatcher.accept(held)
    await rig.dispatcher.accept(webhook)

    row = await rig.send(held.send_id)
    # Sun 08:00 CEST = 06:00 UTC (not 07:00: the clocks went forward overnight)
    assert (row["state"], row["next_at"]) == ("planned", utc(2026, 3, 29, 6, 0))
    assert row["reason"].startswith("held for quiet hours until 2026-03-29 08:00 CEST")
    assert (await rig.send(webhook.send_id))["state"] == "sent"  # not a quiet channel

    await rig.dispatcher.attempt(held.send_id)  # a redelivery does not release it early
    await rig.set_time(utc(2026, 3, 29, 5, 59))
    await rig.sweep()
    assert rig.smtp.messages == []
    await rig.set_time(utc(2026, 3, 29, 6, 0, 1))
    await rig.sweep()
    row = await rig.send(held.send_id)
    assert (row["state"], row["attempts"]) == ("sent", 1)
    assert len(rig.smtp.messages) == 1
    assert await rig.events("message.suppressed") == []


async def test_a_held_send_takes_its_cap_slot_when_it_is_released(rig: Rig) -> None:
    await rig.apply_policy(
        {
            **BERLIN_DAILY_EMAIL_CAP,
            "quiet_hours": {"start": "22:00", "end": "08:00", "channels": ["email"]},
        }
    )
    await rig.set_time(utc(2026, 3, 27, 20, 0))  # Fri 21:00: one send today
    await rig.dispatcher.accept(rig.request())
    await rig.set_time(utc(2026, 3, 27, 22, 30))  # Fri 23:30: held until Sat 08:00
    held = rig.request()
    await rig.dispatcher.accept(held)
    await rig.set_time(utc(2026, 3, 28, 7, 0, 1))
    await rig.sweep()
    assert (await rig.send(held.send_id))["state"] == "sent"  # Saturday's slot


async def test_fifty_concurrent_triggers_with_a_cap_of_three_send_exactly_three(rig: Rig) -> None:
    """T-U6: 50 sends of one user claimed concurrently by two replicas, cap 3."""
    await rig.apply_policy({"frequency_caps": [{"channel": "any", "max": 3, "per": "1d"}]})
    replica = await rig.replica()
    requests = [rig.request() for _ in range(50)]
    await asyncio.gather(
        *(
            (rig.dispatcher if index % 2 else replica).accept(request)
            for index, request in enumerate(requests)
        )
    )

    rows = await rig.pool.fetch("SELECT state, count(*) FROM sends GROUP BY state")
    assert {r["state"]: r["count"] for r in rows} == {"sent": 3, "suppressed": 47}
    assert len(rig.smtp.messages) == 3
    assert len(await rig.events("message.suppressed")) == 47
    assert len(await rig.events("message.sent")) == 3


async def test_the_last_slot_goes_by_priority_then_decided_at_then_send_id(rig: Rig) -> None:
    await rig.apply_policy({"frequency_caps": [{"channel": "email", "max": 2, "per": "1d"}]})
    t0 = utc(2026, 6, 1, 9, 0)
    contenders = {
        "low-old": rig.request(priority=0, decided_at=t0),
        "high-new": rig.request(priority=5, decided_at=t0 + timedelta(minutes=5)),
        "mid": rig.request(priority=1, decided_at=t0 + timedelta(minutes=1)),
        "mid-same-time": rig.request(priority=1, decided_at=t0 + timedelta(minutes=1)),
    }
    for request in contenders.values():
        await rig.dispatcher.record(request)
    # whichever send's own claim runs, all due sends of the user are decided together
    await rig.dispatcher.attempt(contenders["low-old"].send_id)

    states = {name: (await rig.send(r.send_id))["state"] for name, r in contenders.items()}
    mids = sorted(["mid", "mid-same-time"], key=lambda name: contenders[name].send_id)
    assert states["high-new"] == "sent"
    assert states[mids[0]] == "sent"  # equal priority and time: the smaller send_id
    assert states[mids[1]] == states["low-old"] == "suppressed"


async def test_same_send_planned_twice_and_dispatched_twice_arrives_once(rig: Rig) -> None:
    """T-U5: concurrent plans of one send_id give one row; concurrent dispatches (two
    replicas) give one provider arrival."""
    replica = await rig.replica()
    request = rig.request(channel="webhook")
    inserted = await asyncio.gather(rig.dispatcher.record(request), replica.record(request))
    assert sorted(inserted) == [False, True]
    await asyncio.gather(
        rig.dispatcher.accept(request),
        replica.accept(request),
        rig.dispatcher.attempt(request.send_id),
    )
    assert await rig.pool.fetchval("SELECT count(*) FROM sends") == 1
    assert rig.http.webhook_ids() == [request.send_id]
    assert (await rig.send(request.send_id))["state"] == "sent"
