"""The pure backtest simulator: entries, delays, exceptions, inactivity, re-eligibility,
experiment groups, caps, quiet hours, consent and determinism (services/rules/backtest.py)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nudge.cli import rules_cmds
from nudge.cli.main import build_parser, main
from nudge.grpcserver import InvalidArgumentError
from services.dispatch.policy import Reservation, WorkspacePolicy, parse_policy
from services.dispatch.recipient_twin import RecipientFacts, project_recipient, subscription_state
from services.rules.backtest import (
    MAX_RANGE,
    BacktestReport,
    check_period,
    compile_definition,
    parse_moment,
    simulate,
    workspace_settings,
)
from services.rules.cel import CompiledCampaign
from services.rules.domain import RecordedEvent
from services.rules.experiments import GlobalControl
from services.rules.grpc_api import _backtest_response

START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
END = START + timedelta(days=7)
EMAIL = {"channel": "email", "to": "{{ user.traits.email }}", "subject": "s", "body": "b"}
PUSH = {"channel": "push", "to": "{{ user.traits.token }}", "body": "b"}

_positions = iter(range(1, 10**9))


def event(
    user: str, name: str, at: datetime, event_id: str | None = None, **properties: Any
) -> RecordedEvent:
    position = next(_positions)
    return RecordedEvent("ws", user, event_id or f"e{position}", name, at, at, properties, position)


def campaign(**fields: Any) -> CompiledCampaign:
    doc: dict[str, Any] = {
        "id": "c",
        "trigger": {"event": "signup"},
        "message": EMAIL,
        **fields,
    }
    return compile_definition(doc)


def run(
    compiled: CompiledCampaign,
    events: list[RecordedEvent],
    policy: WorkspacePolicy | None = None,
    **options: Any,
) -> BacktestReport:
    return simulate(compiled, events, start=START, end=END, policy=policy, **options)


def at(hours: float) -> datetime:
    return START + timedelta(hours=hours)


# --- entry, delay, exceptions -----------------------------------------------------------------


def test_entry_and_delay_give_the_would_be_send_time() -> None:
    report = run(
        campaign(delay="2h"),
        [event("u1", "signup", at(1), "s1"), event("u2", "page_view", at(1))],
    )
    assert report.entered == {"treatment": ("u1",)}
    [send] = report.sends
    assert (send.user_id, send.trigger_event_id, send.due_at, send.claimed_at) == (
        "u1",
        "s1",
        at(3),
        at(3),
    )
    assert (send.outcome, send.channel, send.branch, send.group) == (
        "sent",
        "email",
        0,
        "treatment",
    )
    assert report.users == 1  # u2 had nothing that could start the campaign
    assert report.decision_counts == {"send_planned": 1, "triggered": 1}


def test_events_before_from_build_state_but_never_start_the_campaign() -> None:
    compiled = campaign(audience="user.events['purchase'].count >= 1")
    report = run(
        compiled,
        [
            event("u1", "signup", START - timedelta(hours=1)),
            event("u1", "purchase", START - timedelta(days=3)),
            event("u2", "signup", at(1)),
            event("u3", "purchase", START - timedelta(days=2)),
            event("u3", "signup", at(2)),
        ],
    )
    assert report.entered == {"treatment": ("u3",)}
    assert report.decision_counts["audience_excluded"] == 1  # u2 never purchased


def test_an_exception_cancels_the_pending_instance_of_its_cart_only() -> None:
    compiled = campaign(
        trigger={"event": "add_to_cart"},
        correlation_key="cart_id",
        delay="1h",
        reeligibility="0s",
        exceptions=[
            {
                "event": "purchase",
                "match": "exception.properties.cart_id == trigger.properties.cart_id",
            }
        ],
    )
    report = run(
        compiled,
        [
            event("u1", "add_to_cart", at(1), "a", cart_id="A"),
            event("u1", "add_to_cart", at(1.1), "b", cart_id="B"),
            event("u1", "purchase", at(1.5), "buy-a", cart_id="A"),
        ],
    )
    assert report.cancelled_by_exception == 1
    assert [(s.trigger_event_id, s.due_at) for s in report.sends] == [("b", at(2.1))]


def test_timers_due_at_or_after_to_do_not_fire_and_are_reported_pending() -> None:
    report = run(campaign(delay="1d"), [event("u1", "signup", END - timedelta(hours=2))])
    assert report.sends == ()
    assert report.pending_at_end == 1
    assert len(report.entries) == 1


def test_an_event_at_the_due_time_is_seen_by_the_fire() -> None:
    compiled = campaign(delay="1h", exceptions=[{"event": "purchase"}])
    report = run(
        compiled, [event("u1", "signup", at(1)), event("u1", "purchase", at(2))]
    )  # the purchase is received exactly at the due time: it cancels before the timer fires
    assert report.cancelled_by_exception == 1
    assert report.sends == ()


# --- inactivity, re-eligibility ---------------------------------------------------------------


def test_inactivity_re_arms_on_every_session_and_sends_after_the_quiet_span() -> None:
    compiled = campaign(trigger={"inactivity": {"event": "session_start", "for": "2d"}})
    report = run(
        compiled,
        [
            event("u1", "session_start", at(0), "s1"),
            event("u1", "session_start", at(24), "s2"),
            event("u2", "session_start", at(0), "t1"),
            event("u2", "session_start", at(47), "t2"),
            event("u2", "session_start", at(90), "t3"),
        ],
    )
    assert [(s.user_id, s.trigger_event_id, s.due_at) for s in report.sends] == [
        ("u1", "s2", at(72)),
        ("u2", "t3", at(138)),
    ]
    assert report.decision_counts["rearmed"] == 3
    assert report.pending_at_end == 0


def test_re_eligibility_counts_from_the_last_send() -> None:
    compiled = campaign(reeligibility="1d")
    report = run(
        compiled,
        [
            event("u1", "signup", at(0), "first"),
            event("u1", "signup", at(10), "too-soon"),
            event("u1", "signup", at(24), "again"),
        ],
    )
    assert [s.trigger_event_id for s in report.sends] == ["first", "again"]
    assert report.decision_counts["not_reeligible"] == 1


def test_once_per_user_by_default() -> None:
    report = run(campaign(), [event("u1", "signup", at(0)), event("u1", "signup", at(100))])
    assert len(report.sends) == 1
    assert report.decision_counts["not_reeligible"] == 1


# --- experiment groups ------------------------------------------------------------------------


def test_groups_get_their_delay_and_held_out_users_get_nothing_sent() -> None:
    compiled = campaign(
        delay="1h",
        experiment={
            "control": 30,
            "variants": [
                {"name": "fast", "weight": 1},
                {"name": "slow", "weight": 1, "delay": "3h"},
            ],
        },
    )
    users = [f"u{i}" for i in range(60)]
    report = run(compiled, [event(user, "signup", at(1), f"s-{user}") for user in users])
    assert set(report.entered) == {"control", "fast", "slow"}
    assert sum(len(members) for members in report.entered.values()) == 60
    for send in report.sends:
        expected = {"control": at(2), "fast": at(2), "slow": at(4)}[send.group]
        assert send.due_at == expected
        assert send.outcome == ("held_out" if send.group == "control" else "sent")
        assert (send.claimed_at is None) == (send.group == "control")
    assert report.outcomes["held_out"] == len(report.entered["control"])


def test_global_control_holds_users_out_of_marketing_campaigns() -> None:
    compiled = campaign()
    users = [f"u{i}" for i in range(40)]
    report = run(
        compiled,
        [event(user, "signup", at(1)) for user in users],
        global_control=GlobalControl(50.0),
    )
    assert 0 < len(report.entered["global_control"]) < 40
    assert report.outcomes["held_out"] == len(report.entered["global_control"])


# --- caps, quiet hours, consent ---------------------------------------------------------------


def test_a_frequency_cap_suppresses_and_counts_live_sends_of_other_campaigns() -> None:
    policy = parse_policy({"frequency_caps": [{"channel": "any", "max": 1, "per": "1d"}]})
    compiled = campaign(reeligibility="0s")
    report = run(
        compiled,
        [
            event("u1", "signup", at(1), "a"),
            event("u1", "signup", at(2), "b"),
            event("u2", "signup", at(1), "c"),
        ],
        policy,
        reservations={"u2": [Reservation("email", at(0.5))]},
    )
    assert [(s.trigger_event_id, s.outcome, s.code) for s in report.sends] == [
        ("a", "sent", ""),
        ("c", "suppressed", "frequency_cap"),
        ("b", "suppressed", "frequency_cap"),
    ]
    assert report.frequency_caps == {"frequency cap: at most 1 messages per day (UTC)": 2}
    assert report.suppressed == {"frequency_cap": 2}


def test_quiet_hours_hold_a_send_until_the_window_ends_in_the_users_zone() -> None:
    policy = parse_policy({"quiet_hours": {"start": "21:00", "end": "08:00", "channels": ["push"]}})
    compiled = campaign(message=PUSH)
    report = run(
        compiled,
        [
            event("u1", "$identify", START - timedelta(days=1), timezone="Europe/Paris"),
            event("u1", "signup", at(22), "late"),  # 23:00 in Paris
            event("u2", "signup", at(12), "noon"),
        ],
        policy,
    )
    held, free = sorted(report.sends, key=lambda s: s.user_id)
    assert (held.due_at, held.held_until, held.claimed_at) == (at(22), at(31), at(31))
    assert (free.held_until, free.claimed_at) == (None, at(12))
    assert report.quiet_hours_holds == 1


def test_consent_at_claim_time_comes_from_the_twin() -> None:
    compiled = campaign(delay="1h")
    report = run(
        compiled,
        [
            event("u1", "signup", at(1), "s1"),
            event("u1", "$identify", at(1.5), email_subscribe="unsubscribed"),
            event("u2", "$identify", at(0), email_subscribe="unsubscribed"),
            event("u2", "$identify", at(0.5), email_subscribe=True),
            event("u2", "signup", at(1), "s2"),
        ],
    )
    outcomes = {(s.trigger_event_id, s.outcome, s.code) for s in report.sends}
    assert outcomes == {("s1", "suppressed", "unsubscribed"), ("s2", "sent", "")}


def test_an_address_reported_undeliverable_is_suppressed() -> None:
    report = run(
        campaign(),
        [
            event("u1", "$identify", at(0), email="U1@Example.test"),
            event(
                "u1",
                "message.failed",
                at(0.5),
                channel="email",
                undeliverable_address="u1@example.test",
            ),
            event("u1", "signup", at(1), "s1"),
        ],
    )
    [send] = report.sends
    assert (send.outcome, send.code) == ("suppressed", "undeliverable")


def test_the_twin_mirrors_the_trigger_rules() -> None:
    assert [subscription_state(v) for v in (None, True, False, " Opted_In ", "nope", 3)] == [
        None,
        "subscribed",
        "unsubscribed",
        "opted_in",
        "unsubscribed",
        "unsubscribed",
    ]
    facts = project_recipient(RecipientFacts(), "$identify", {"timezone": "x" * 80})
    assert facts.exists
    assert facts.timezone == "x" * 64
    failed = project_recipient(
        facts, "message.failed", {"channel": "email", "undeliverable_address": "a@b"}
    )
    assert failed.undeliverable == {"email": frozenset({"a@b"})}
    cleared = project_recipient(failed, "$identify", {"push_subscribe": "opted_in"})
    assert cleared.undeliverable == failed.undeliverable  # another channel's opt-in
    cleared = project_recipient(failed, "$identify", {"email_subscribe": "opted_in"})
    assert cleared.undeliverable == {}
    assert cleared.timezone == "x" * 64  # untouched: the key was absent


# --- determinism, JSON, arguments -------------------------------------------------------------


def test_same_input_same_report_whatever_the_user_order() -> None:
    compiled = campaign(
        delay="1h",
        reeligibility="0s",
        exceptions=[{"event": "purchase"}],
        experiment={"control": 20, "variants": [{"name": "a", "weight": 1}]},
    )
    events = []
    for index in range(30):
        user = f"u{index}"
        events.append(event(user, "signup", at(index % 5), f"s{index}"))
        if index % 3 == 0:
            events.append(event(user, "purchase", at(index % 5 + 0.5)))
    first = run(compiled, events).to_dict(with_decisions=True)
    users = sorted({e.user_id for e in events})
    random.Random(7).shuffle(users)  # users in another order, each user's events in store order
    shuffled = [e for user in users for e in events if e.user_id == user]
    second = run(compiled, shuffled).to_dict(with_decisions=True)
    third = run(compiled, events).to_dict(with_decisions=True)
    assert first == second == third
    assert json.loads(json.dumps(first)) == first
    assert first["cancelled_by_exception"] == 10


def test_arguments_are_checked_with_clear_errors() -> None:
    assert parse_moment("2026-03-02", "from") == START
    assert parse_moment("2026-03-02T01:00:00+01:00", "from") == START
    assert parse_moment("2026-03-02T00:00:00", "from") == START
    with pytest.raises(InvalidArgumentError, match="YYYY-MM-DD") as bad_date:
        parse_moment("March 2nd", "from")
    assert bad_date.value.field == "from"
    with pytest.raises(InvalidArgumentError, match="must be after from_time"):
        check_period(END, START)
    with pytest.raises(InvalidArgumentError, match="at most 366 days"):
        check_period(START, START + MAX_RANGE + timedelta(days=1))
    with pytest.raises(InvalidArgumentError) as bad_field:
        compile_definition({"id": "c", "trigger": {"event": "x"}, "message": EMAIL, "delay": "1y"})
    assert bad_field.value.field == "delay"


def test_the_global_control_block_is_read_from_the_policy_document() -> None:
    policy, control = workspace_settings(
        ({"default_timezone": "Europe/Paris", "global_control": {"percent": 5}}, 3)
    )
    assert (policy.default_timezone, control) == ("Europe/Paris", GlobalControl(5.0))
    assert workspace_settings(None) == (WorkspacePolicy(), None)


# --- the command line and the RPC response ----------------------------------------------------


def test_nudge_backtest_parses_and_checks_dates_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["backtest", "c.yaml", "--from", "2026-03-02", "--to", "x"])
    assert (args.func, args.start, args.end, args.timeout) == (
        rules_cmds.run_backtest,
        "2026-03-02",
        "x",
        rules_cmds.BACKTEST_TIMEOUT_S,
    )
    assert main(["backtest", "c.yaml", "--from", "2026-03-02", "--to", "x"]) == 2
    assert "--to: must be a date" in capsys.readouterr().err
    assert main(["backtest", "c.yaml", "--from", "2026-03-09", "--to", "2026-03-02"]) == 2
    assert "--to: must be after --from" in capsys.readouterr().err
    missing = str(tmp_path / "missing.yaml")
    assert main(["backtest", missing, "--from", "2026-03-02", "--to", "2026-03-09"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_the_response_and_its_json_keep_the_report() -> None:
    policy = parse_policy({"quiet_hours": {"start": "21:00", "end": "08:00", "channels": ["push"]}})
    report = run(
        campaign(message=PUSH, experiment={"control": 50}),
        [event(f"u{i}", "signup", at(22), f"s{i}") for i in range(8)],
        policy,
    )
    response = _backtest_response(report)
    data = rules_cmds.backtest_data(response)
    assert data["sends_count"] == len(report.sends) == 8
    assert data["entered"] == {
        group: {"count": len(users), "users": list(users)}
        for group, users in report.entered.items()
    }
    assert [s["held_until"] for s in data["sends"]] == [
        None if s.held_until is None else s.held_until.isoformat() for s in report.sends
    ]
    assert data["quiet_hours_holds"] == report.quiet_hours_holds == len(report.entered["treatment"])
    text = rules_cmds.format_backtest(response, START, END)
    assert text.startswith("backtest of c from 2026-03-02T00:00:00+00:00")
    assert "held for quiet hours: " in text
