import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.rules.domain import (
    MAX_SUMMED_PROPERTIES,
    RETENTION_DAYS,
    LifecyclePolicy,
    RecordedEvent,
    StateError,
    UserState,
    cel_view,
    evolve,
    fold,
    lifecycle,
    state_from_dict,
    state_to_dict,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
_positions = iter(range(1, 10**9))


def event(
    name: str,
    at: datetime = T0,
    user: str = "u1",
    occurred_at: datetime | None = None,
    **properties: Any,
) -> RecordedEvent:
    position = next(_positions)
    return RecordedEvent(
        workspace_id="ws",
        user_id=user,
        event_id=f"e{position}",
        name=name,
        occurred_at=occurred_at or at,
        received_at=at,
        properties=properties,
        global_position=position,
    )


def folded(*events: RecordedEvent) -> UserState:
    state = fold(None, events)
    assert state is not None
    return state


def test_first_event_creates_the_state() -> None:
    state = evolve(None, event("session_start"))
    assert (state.workspace_id, state.user_id) == ("ws", "u1")
    assert state.first_seen == state.last_seen == T0
    assert state.event_count == 1
    assert state.events["session_start"].count == 1


def test_counts_first_and_last_times_are_kept_per_event_name() -> None:
    state = folded(
        event("session_start", T0),
        event("page_view", T0 + timedelta(minutes=1)),
        event("session_start", T0 + timedelta(hours=2)),
    )
    sessions = state.events["session_start"]
    assert (sessions.count, sessions.first_at, sessions.last_at) == (
        2,
        T0,
        T0 + timedelta(hours=2),
    )
    assert state.events["page_view"].count == 1
    assert state.first_seen == T0
    assert state.last_seen == T0 + timedelta(hours=2)
    assert state.event_count == 3


def test_purchase_amounts_are_summed_per_property() -> None:
    state = folded(
        event("purchase", amount=10, items=2.0, currency="EUR", gift=True),
        event("purchase", T0 + timedelta(hours=1), amount=15.5),
    )
    assert state.events["purchase"].sums == {"amount": 25.5, "items": 2.0}
    assert all(isinstance(v, float) for v in state.events["purchase"].sums.values())


def test_non_finite_and_huge_numbers_are_not_summed() -> None:
    state = folded(event("purchase", amount=float("inf"), big=10**400, fine=1))
    assert state.events["purchase"].sums == {"fine": 1.0}


def test_at_most_a_bounded_number_of_properties_is_summed() -> None:
    many: dict[str, Any] = {f"p{i:02}": i for i in range(MAX_SUMMED_PROPERTIES + 5)}
    state = folded(event("metrics", **many), event("metrics", **many))
    sums = state.events["metrics"].sums
    assert len(sums) == MAX_SUMMED_PROPERTIES
    assert sums["p00"] == 0.0
    assert sums["p01"] == 2.0
    assert f"p{MAX_SUMMED_PROPERTIES:02}" not in sums


def test_times_come_from_received_at_not_the_client_clock() -> None:
    skewed = T0 - timedelta(days=20)
    state = folded(event("session_start", T0, occurred_at=skewed))
    assert state.first_seen == T0
    assert state.events["session_start"].first_at == T0
    assert cel_view(state, T0)["events"]["session_start"]["last_1d"]["count"] == 1


def test_out_of_order_received_times_keep_first_and_last_right() -> None:
    state = folded(event("a", T0), event("a", T0 - timedelta(seconds=1)))
    assert state.events["a"].first_at == T0 - timedelta(seconds=1)
    assert state.events["a"].last_at == T0
    assert state.first_seen == T0 - timedelta(seconds=1)


def test_identify_merges_traits_and_a_null_deletes_one() -> None:
    state = folded(
        event("$identify", email="a@example.test", country="DE", plan="free"),
        event("$identify", T0 + timedelta(minutes=1), plan="pro", country=None),
    )
    assert state.traits == {"email": "a@example.test", "plan": "pro"}


def test_identify_is_not_activity_and_not_an_event_aggregate() -> None:
    state = folded(event("$identify", email="a@example.test"))
    assert state.first_seen is None
    assert state.last_seen is None
    assert state.events == {}
    assert state.event_count == 1


def test_delivery_outcomes_are_counted_but_are_not_user_activity() -> None:
    state = folded(event("session_start", T0), event("message.sent", T0 + timedelta(days=20)))
    assert state.last_seen == T0
    assert state.events["message.sent"].count == 1


def test_a_valid_timezone_trait_sets_the_timezone_and_an_invalid_one_clears_it() -> None:
    state = folded(event("$identify", timezone="Europe/Berlin"))
    assert state.timezone == "Europe/Berlin"
    state = evolve(state, event("$identify", T0, timezone="Mars/Olympus"))
    assert state.timezone is None
    assert state.traits["timezone"] == "Mars/Olympus"
    state = evolve(state, event("$identify", T0, timezone="../../etc/passwd"))
    assert state.timezone is None
    state = evolve(state, event("$identify", T0, timezone="UTC"))
    assert state.timezone == "UTC"
    state = evolve(state, event("$identify", T0, timezone=None))
    assert state.timezone is None
    assert "timezone" not in state.traits


def test_evolve_never_mutates_the_previous_state() -> None:
    before = folded(event("purchase", amount=10), event("$identify", plan="free"))
    snapshot = state_to_dict(before)
    evolve(before, event("purchase", T0 + timedelta(hours=1), amount=5))
    evolve(before, event("purchase", T0 + timedelta(days=3), amount=5))
    evolve(before, event("$identify", plan="pro", email="x"))
    assert state_to_dict(before) == snapshot


def test_an_event_of_another_user_is_refused() -> None:
    state = folded(event("a"))
    with pytest.raises(StateError):
        evolve(state, event("a", user="u2"))


def test_naive_received_at_is_refused() -> None:
    with pytest.raises(StateError):
        evolve(None, event("a", datetime(2026, 1, 1)))


def test_windows_roll_an_event_8_days_ago_is_in_last_30d_not_last_7d() -> None:
    now = T0 + timedelta(days=8)
    state = folded(event("purchase", T0, amount=100), event("purchase", now, amount=1))
    view = cel_view(state, now)["events"]["purchase"]
    assert view["last_1d"] == {"count": 1, "sum": {"amount": 1.0}}
    assert view["last_7d"] == {"count": 1, "sum": {"amount": 1.0}}
    assert view["last_30d"] == {"count": 2, "sum": {"amount": 101.0}}
    assert view["last_90d"] == {"count": 2, "sum": {"amount": 101.0}}
    assert view["count"] == 2
    assert view["sum"] == {"amount": 101.0}


def test_windows_are_relative_to_now_not_to_the_last_event() -> None:
    state = folded(event("session_start", T0))
    events_at = {
        days: cel_view(state, T0 + timedelta(days=days))["events"]["session_start"]
        for days in (0, 6, 7, 29, 30, 89, 90)
    }
    assert [events_at[d]["last_7d"]["count"] for d in (0, 6, 7)] == [1, 1, 0]
    assert [events_at[d]["last_30d"]["count"] for d in (29, 30)] == [1, 0]
    assert [events_at[d]["last_90d"]["count"] for d in (89, 90)] == [1, 0]
    assert events_at[90]["count"] == 1  # lifetime aggregates never expire


def test_window_granularity_is_one_utc_calendar_day() -> None:
    late = datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
    state = folded(event("a", late))
    assert cel_view(state, late + timedelta(minutes=2))["events"]["a"]["last_1d"]["count"] == 0
    assert cel_view(state, late + timedelta(minutes=2))["events"]["a"]["last_7d"]["count"] == 1


def test_buckets_older_than_the_retention_are_pruned() -> None:
    state = folded(*(event("session_start", T0 + timedelta(days=d)) for d in range(0, 200, 1)))
    days = state.events["session_start"].days
    assert len(days) == RETENTION_DAYS
    assert [b.day for b in days] == sorted(b.day for b in days)
    newest = (T0 + timedelta(days=199)).toordinal()
    assert days[0].day == newest - RETENTION_DAYS + 1
    assert state.events["session_start"].count == 200


def test_an_event_older_than_the_retention_counts_for_life_but_has_no_bucket() -> None:
    state = folded(event("a", T0), event("a", T0 - timedelta(days=RETENTION_DAYS + 5)))
    stats = state.events["a"]
    assert stats.count == 2
    assert [b.count for b in stats.days] == [1]


def test_a_late_bucket_is_inserted_in_day_order() -> None:
    state = folded(
        event("a", T0, n=1), event("a", T0 + timedelta(days=2), n=2), event("a", T0, n=4)
    )
    days = state.events["a"].days
    assert [(b.count, dict(b.sums)) for b in days] == [(2, {"n": 5.0}), (1, {"n": 2.0})]
    state = evolve(state, event("a", T0 + timedelta(days=1), n=8))
    assert [b.count for b in state.events["a"].days] == [2, 1, 1]


def random_events(seed: int, count: int = 400) -> list[RecordedEvent]:
    rng = random.Random(seed)
    names = ["session_start", "purchase", "page_view", "$identify", "message.sent"]
    out = []
    at = T0
    for _ in range(count):
        at += timedelta(minutes=rng.randint(-30, 600))
        name = rng.choice(names)
        props: dict[str, Any] = {}
        if name == "purchase":
            props = {"amount": round(rng.uniform(1, 200), 2), "cart_id": str(rng.randint(1, 3))}
        elif name == "$identify":
            props = {"plan": rng.choice(["free", "pro", None]), "timezone": "Europe/Berlin"}
        out.append(event(name, at, **props))
    return out


def test_replaying_the_same_events_in_the_same_order_gives_an_equal_state() -> None:
    events = random_events(7)
    live = None
    for item in events:
        live = evolve(live, item)
    assert live is not None
    replayed = fold(None, events)
    assert replayed == live
    assert state_to_dict(replayed) == state_to_dict(live)


def test_state_dict_round_trip_is_json_safe_and_exact() -> None:
    state = fold(None, random_events(11))
    assert state is not None
    stored = json.loads(json.dumps(state_to_dict(state)))
    assert state_from_dict(stored) == state
    assert state_to_dict(state_from_dict(stored)) == stored
    resumed = evolve(state_from_dict(stored), event("purchase", T0 + timedelta(days=400), amount=1))
    direct = evolve(state, event("purchase", T0 + timedelta(days=400), amount=1))
    assert resumed == direct


def test_a_stored_state_of_an_unknown_format_is_refused() -> None:
    stored = state_to_dict(folded(event("a")))
    with pytest.raises(StateError):
        state_from_dict(stored | {"format": 99})


def test_the_view_has_zero_entries_for_referenced_names_the_user_never_did() -> None:
    state = folded(event("session_start"))
    view = cel_view(state, T0, ["feature_x_used", "session_start"], sum_properties=["amount"])
    assert set(view["events"]) == {"feature_x_used", "session_start"}
    never = view["events"]["feature_x_used"]
    assert never["count"] == 0
    assert never["first_at"] is None
    assert never["last_30d"] == {"count": 0, "sum": {"amount": 0.0}}
    assert view["events"]["session_start"]["sum"] == {"amount": 0.0}


def test_the_view_holds_every_name_when_none_is_referenced_explicitly() -> None:
    state = folded(event("a"), event("b"))
    assert set(cel_view(state, T0)["events"]) == {"a", "b"}


def test_the_view_is_plain_json_with_iso_timestamps() -> None:
    state = folded(event("$identify", email="a@example.test", timezone="Europe/Berlin"), event("a"))
    view = cel_view(state, T0)
    assert json.loads(json.dumps(view)) == view
    assert view["id"] == "u1"
    assert view["first_seen"] == T0.isoformat()
    assert view["timezone"] == "Europe/Berlin"
    assert view["traits"]["email"] == "a@example.test"
    assert view["events"]["a"]["last_at"] == T0.isoformat()


def test_lifecycle_defaults() -> None:
    fresh = folded(event("session_start"))
    assert lifecycle(fresh, T0 + timedelta(days=1)) == "onboarding"
    assert lifecycle(fresh, T0 + timedelta(days=10)) == "active"
    assert lifecycle(fresh, T0 + timedelta(days=14)) == "lapsed"
    whale = evolve(fresh, event("purchase", T0 + timedelta(days=8), amount=500))
    assert lifecycle(whale, T0 + timedelta(days=9)) == "whale"
    assert lifecycle(whale, T0 + timedelta(days=8 + 31)) == "lapsed"
    assert lifecycle(folded(event("$identify", plan="x")), T0) == "onboarding"
    assert cel_view(whale, T0 + timedelta(days=9))["lifecycle"] == "whale"


def test_lifecycle_thresholds_are_configurable() -> None:
    policy = LifecyclePolicy(
        lapsed_after=timedelta(days=3),
        whale_event="order",
        whale_property="total",
        whale_window_days=7,
        whale_min_sum=50,
        onboarding_for=timedelta(days=1),
    )
    state = folded(event("order", T0, total=60))
    assert lifecycle(state, T0 + timedelta(hours=1), policy) == "whale"
    assert lifecycle(state, T0 + timedelta(days=3), policy) == "lapsed"
    assert cel_view(state, T0, policy=policy)["lifecycle"] == "whale"
    with pytest.raises(ValueError, match="whale_window_days"):
        LifecyclePolicy(whale_window_days=91)
