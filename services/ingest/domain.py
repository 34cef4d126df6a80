"""Validation of incoming events: hard limits, text, timestamps. Pure; standard library only."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

MAX_EVENTS_PER_BATCH = 500
MAX_ID_CHARS = 128
MAX_USER_ID_CHARS = 256
MAX_NAME_CHARS = 128
MAX_PROPERTIES_BYTES = 32 * 1024
MAX_CONTEXT_BYTES = 8 * 1024
MAX_DEPTH = 8
MAX_PAST = timedelta(days=30)
MAX_FUTURE = timedelta(minutes=5)

_NAME = re.compile(r"^[A-Za-z0-9_.:\- ]+$")
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x1f\x7f\u202a-\u202e\u2066-\u2069\ufeff]")


class EventRejectedError(Exception):
    """One event is invalid; `field` is the path of the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class ValidEvent:
    """An event that passed validation, with ids normalized (NFC)."""

    event_id: str
    user_id: str
    name: str
    occurred_at: datetime | None
    properties: dict[str, Any]
    context: dict[str, Any]


def _identifier(value: str, field: str, max_chars: int) -> str:
    normalized = unicodedata.normalize("NFC", value).strip()
    if not normalized:
        raise EventRejectedError(field, "is required")
    if len(normalized) > max_chars:
        raise EventRejectedError(field, f"is longer than {max_chars} characters")
    if _FORBIDDEN_CHARS.search(normalized):
        raise EventRejectedError(field, "contains control or bidirectional-override characters")
    try:
        normalized.encode("utf-8")
    except UnicodeEncodeError:
        raise EventRejectedError(field, "is not valid UTF-8 (lone surrogate)") from None
    return normalized


def _check_value(value: Any, field: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise EventRejectedError(field, f"nesting is deeper than {MAX_DEPTH}")
    if isinstance(value, str):
        if "\x00" in value:
            raise EventRejectedError(field, "contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise EventRejectedError(field, "is not valid UTF-8 (lone surrogate)") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise EventRejectedError(field, "is not a finite number")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_value(key, f"{field}.{key}", depth)
            _check_value(item, f"{field}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(item, f"{field}[{index}]", depth + 1)


def _document(value: Mapping[str, Any], field: str, max_bytes: int) -> dict[str, Any]:
    _check_value(value, field, 1)
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > max_bytes:
        raise EventRejectedError(field, f"is {size} bytes; the limit is {max_bytes}")
    return dict(value)


def validate_event(
    *,
    event_id: str,
    user_id: str,
    name: str,
    occurred_at: datetime | None,
    properties: Mapping[str, Any],
    context: Mapping[str, Any],
    now: datetime,
    field: str,
    allow_reserved_name: bool = False,
) -> ValidEvent:
    """Validate one event against the hard limits; `now` is the server clock."""
    valid_id = _identifier(event_id, f"{field}.event_id", MAX_ID_CHARS)
    valid_user = _identifier(user_id, f"{field}.user_id", MAX_USER_ID_CHARS)
    valid_name = _identifier(name, f"{field}.name", MAX_NAME_CHARS)
    if valid_name.startswith("$") and not allow_reserved_name:
        raise EventRejectedError(f"{field}.name", "names starting with $ are reserved")
    if not _NAME.match(valid_name.removeprefix("$")):
        raise EventRejectedError(
            f"{field}.name", "may contain only letters, digits, space and _ . : -"
        )
    if occurred_at is not None:
        if occurred_at < now - MAX_PAST:
            raise EventRejectedError(f"{field}.occurred_at", "is more than 30 days in the past")
        if occurred_at > now + MAX_FUTURE:
            raise EventRejectedError(f"{field}.occurred_at", "is more than 5 minutes in the future")
    return ValidEvent(
        event_id=valid_id,
        user_id=valid_user,
        name=valid_name,
        occurred_at=occurred_at,
        properties=_document(properties, f"{field}.properties", MAX_PROPERTIES_BYTES),
        context=_document(context, f"{field}.context", MAX_CONTEXT_BYTES),
    )


class TokenBucket:
    """A token bucket refilled continuously; `take(n, now)` answers whether n tokens were taken."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.updated = 0.0

    def take(self, amount: float, now: float) -> bool:
        """Take `amount` tokens at monotonic time `now` if available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` tokens would be available."""
        return max(0.0, (amount - self.tokens) / self.rate_per_s)
