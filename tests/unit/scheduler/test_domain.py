"""Pure scheduler logic: request validation and the firing loop's sleep."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.scheduler.domain import (
    CONTENDED_RETRY_S,
    MAX_PAYLOAD_BYTES,
    Timer,
    TimerRejectedError,
    TimerState,
    seconds_to_sleep,
    validate_timer_request,
)
from services.scheduler.settings import Settings

DUE = datetime(2030, 1, 1, tzinfo=UTC)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _request(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "timer_id": str(uuid.uuid4()),
        "workspace_id": "acme",
        "topic": "inactivity_check",
        "due_at": DUE,
        "payload": b"",
        "traceparent": TRACEPARENT,
    }
    fields.update(overrides)
    return fields


def test_valid_request_is_parsed() -> None:
    fields = _request()

    request = validate_timer_request(**fields)

    assert request.timer_id == uuid.UUID(fields["timer_id"])
    assert request.topic == "inactivity_check"
    assert request.due_at == DUE


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"timer_id": ""}, "timer.timer_id"),
        ({"timer_id": "1234"}, "timer.timer_id"),
        ({"workspace_id": ""}, "timer.workspace_id"),
        ({"workspace_id": "Acme"}, "timer.workspace_id"),
        ({"workspace_id": "a" * 64}, "timer.workspace_id"),
        ({"topic": ""}, "timer.topic"),
        ({"topic": "a.b"}, "timer.topic"),
        ({"topic": "x" * 65}, "timer.topic"),
        ({"topic": "UPPER"}, "timer.topic"),
        ({"due_at": None}, "timer.due_at"),
        ({"due_at": datetime(2030, 1, 1)}, "timer.due_at"),  # naive
        ({"payload": b"x" * (MAX_PAYLOAD_BYTES + 1)}, "timer.payload"),
        ({"traceparent": "00-abc"}, "timer.traceparent"),
    ],
)
def test_invalid_request_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(TimerRejectedError) as raised:
        validate_timer_request(**_request(**overrides))

    assert raised.value.field == field


def test_empty_traceparent_is_allowed() -> None:
    assert validate_timer_request(**_request(traceparent="")).traceparent == ""


def test_msg_id_is_timer_id_and_version() -> None:
    timer_id = uuid.uuid4()
    timer = Timer(timer_id, "acme", "t", DUE, b"", "", TimerState.PENDING, 3)

    assert timer.msg_id == f"{timer_id}:3"


@pytest.mark.parametrize(
    ("next_due_in", "fired", "expected"),
    [
        (None, 0, 1.0),
        (timedelta(seconds=0.25), 0, 0.25),
        (timedelta(hours=1), 3, 1.0),
        (timedelta(seconds=-5), 4, 0.0),
        (timedelta(seconds=-5), 0, CONTENDED_RETRY_S),
        (timedelta(0), 0, CONTENDED_RETRY_S),
    ],
)
def test_sleep_until_next_due_time_capped_by_max_idle(
    next_due_in: timedelta | None, fired: int, expected: float
) -> None:
    assert seconds_to_sleep(next_due_in, 1.0, fired=fired) == pytest.approx(expected)


def test_settings_defaults_and_overrides() -> None:
    env = {"DATABASE_URL": "postgresql:///x", "NATS_URL": "nats://127.0.0.1:4222"}

    defaults = Settings.from_env(env)
    tuned = Settings.from_env(
        {**env, "NUDGE_SCHEDULER_BATCH": "500", "NUDGE_SCHEDULER_MAX_IDLE_S": "0.25"}
    )

    assert (defaults.address, defaults.nats_prefix) == ("127.0.0.1:50053", "nudge")
    assert (defaults.batch_size, defaults.max_idle_s) == (100, 1.0)
    assert (tuned.batch_size, tuned.max_idle_s) == (500, 0.25)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("NUDGE_SCHEDULER_BATCH", "0"), ("NUDGE_SCHEDULER_MAX_IDLE_S", "-1"), ("DATABASE_URL", "")],
)
def test_settings_fail_fast_naming_the_variable(variable: str, value: str) -> None:
    from nudge.config import ConfigError

    env = {"DATABASE_URL": "postgresql:///x", "NATS_URL": "nats://127.0.0.1:4222", variable: value}

    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)

    assert raised.value.variable == variable
