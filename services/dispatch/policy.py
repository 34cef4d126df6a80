"""Pure delivery policy: workspace policy documents, consent, frequency caps counted in the
user's calendar, quiet hours, and who gets the last cap slot. Stdlib only, and the pure
experiments module of rules for the workspace's global control group (which rules applies,
not dispatch: it is validated and stored here because it lives in the workspace policy).

Everything here is decided at claim time, inside the claiming transaction, from facts the
application loads under the user's lock (docs/dispatch.md):

1. consent: a marketing send on a channel the user unsubscribed from (or, where the workspace
   requires it, never opted in to) is suppressed; `transactional` ignores subscriptions.
2. quiet hours: a marketing send on a quiet channel during the user's quiet window is held until
   the window ends (not dropped).
3. frequency caps: a marketing send that would exceed a cap is suppressed; one that fits reserves
   a slot (its claim time), released again only if the send fails permanently.

Several sends of one user claimed together are decided in competition order: priority
(highest first), then decided_at (oldest first), then send_id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from email.utils import parseaddr
from enum import Enum
from functools import lru_cache
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.rules.experiments import ExperimentError, GlobalControl, parse_global_control

CONSENT_CHANNELS: Final = ("email", "push", "sms")
CHANNELS: Final = ("email", "push", "sms", "webhook", "console")
CAP_CHANNELS: Final = ("any", *CHANNELS)
DEFAULT_QUIET_CHANNELS: Final = ("push", "sms")
MAX_CAPS: Final = 20
MAX_CAP: Final = 100_000

SUBSCRIBED: Final = "subscribed"
OPTED_IN: Final = "opted_in"
UNSUBSCRIBED: Final = "unsubscribed"

Unit = Literal["m", "h", "d", "w"]
_PERIOD: Final = re.compile(r"^([1-9][0-9]{0,3})([mhdw])$")
_CLOCK: Final = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")
_UNIT_NAMES: Final = {"m": "minute", "h": "hour", "d": "day", "w": "week"}
_MAX_PERIOD: Final = {"m": 1440, "h": 744, "d": 366, "w": 53}


class PolicyError(ValueError):
    """A workspace policy document is invalid; `path` names the field (`frequency_caps[1].per`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Period:
    """`count` calendar `unit`s in the user's time zone, the current one included: `1d` is
    today (local midnight to local midnight), `7d` today and the six days before, `1w` this
    week (from Monday), `1h` this clock hour."""

    count: int
    unit: Unit

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    def describe(self) -> str:
        """`day`, `3 days`."""
        name = _UNIT_NAMES[self.unit]
        return name if self.count == 1 else f"{self.count} {name}s"


@dataclass(frozen=True)
class FrequencyCap:
    """At most `max` marketing sends on `channel` (`any`: all channels together) per `per`."""

    channel: str
    max: int
    per: Period

    def applies_to(self, channel: str) -> bool:
        return self.channel in ("any", channel)

    def describe(self) -> str:
        scope = "messages" if self.channel == "any" else f"{self.channel} messages"
        return f"at most {self.max} {scope} per {self.per.describe()}"


@dataclass(frozen=True)
class QuietHours:
    """Marketing sends on `channels` are held while the user's local wall clock is in
    [start, end); `start > end` wraps midnight."""

    start: time
    end: time
    channels: frozenset[str]

    def contains(self, wall: time) -> bool:
        if self.start < self.end:
            return self.start <= wall < self.end
        return wall >= self.start or wall < self.end


@dataclass(frozen=True)
class WorkspacePolicy:
    """The delivery policy of a workspace; the default applies until one is applied."""

    default_timezone: str = "UTC"
    frequency_caps: tuple[FrequencyCap, ...] = ()
    quiet_hours: QuietHours | None = None
    require_opt_in: frozenset[str] = field(default_factory=frozenset)
    global_control: GlobalControl | None = None
    """`percent` of the workspace's users held out of every marketing campaign (rules reads it
    from the stored document, `policy->'global_control'`); None: nobody."""

    def to_dict(self) -> dict[str, Any]:
        """The normalized document (what is stored and what `parse_policy` inverts).

        `global_control` appears only when set, as `{percent, salt?}`: a policy applied before
        it existed keeps its stored form (re-applying it is still a no-op)."""
        out: dict[str, Any] = {
            "default_timezone": self.default_timezone,
            "frequency_caps": [
                {"channel": c.channel, "max": c.max, "per": str(c.per)} for c in self.frequency_caps
            ],
        }
        if self.quiet_hours is not None:
            out["quiet_hours"] = {
                "start": self.quiet_hours.start.strftime("%H:%M"),
                "end": self.quiet_hours.end.strftime("%H:%M"),
                "channels": sorted(self.quiet_hours.channels),
            }
        out["require_opt_in"] = sorted(self.require_opt_in)
        if self.global_control is not None:
            out["global_control"] = self.global_control.to_dict()
        return out


# --------------------------------------------------------------------------------------------
# parsing


_TOP_KEYS: Final = (
    "default_timezone",
    "frequency_caps",
    "quiet_hours",
    "require_opt_in",
    "global_control",
)


def _check_keys(doc: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    allowed_set = set(allowed)
    for key in doc:
        if key not in allowed_set:
            where = f"{path}.{key}" if path else str(key)
            raise PolicyError(
                where, f"unknown field (expected one of: {', '.join(sorted(allowed_set))})"
            )


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(path, "must be a mapping")
    return value


def _channel_list(value: Any, path: str, allowed: Sequence[str]) -> frozenset[str]:
    if not isinstance(value, list):
        raise PolicyError(path, "must be a list of channels")
    channels: set[str] = set()
    for index, item in enumerate(value):
        if item not in allowed:
            raise PolicyError(f"{path}[{index}]", f"must be one of {', '.join(allowed)}")
        channels.add(item)
    return frozenset(channels)


def parse_period(text: Any, path: str = "per") -> Period:
    """`30m`, `1h`, `1d`, `7d`, `1w`."""
    if not isinstance(text, str):
        raise PolicyError(path, "must be a string like 1d, 12h, 30m or 1w")
    match = _PERIOD.match(text.strip())
    if not match:
        raise PolicyError(path, f"must be a count and a unit (m, h, d or w), like 1d; got {text!r}")
    count, unit = int(match[1]), match[2]
    if count > _MAX_PERIOD[unit]:
        raise PolicyError(path, f"must be at most {_MAX_PERIOD[unit]}{unit}")
    return Period(count, unit)  # type: ignore[arg-type]


def _clock(value: Any, path: str) -> time:
    if not isinstance(value, str) or not _CLOCK.match(value.strip()):
        raise PolicyError(path, f'must be a 24-hour time "HH:MM", got {value!r}')
    hours, minutes = value.strip().split(":")
    return time(int(hours), int(minutes))


def parse_policy(doc: Any) -> WorkspacePolicy:
    """Validate a policy document (the YAML of `nudge workspace apply`); PolicyError if invalid."""
    doc = _mapping(doc, "")
    _check_keys(doc, _TOP_KEYS, "")
    default_timezone = doc.get("default_timezone", "UTC")
    if not isinstance(default_timezone, str) or zone(default_timezone) is None:
        raise PolicyError("default_timezone", f"unknown IANA time zone {default_timezone!r}")
    caps_doc = doc.get("frequency_caps", [])
    if caps_doc is None:
        caps_doc = []
    if not isinstance(caps_doc, list):
        raise PolicyError("frequency_caps", "must be a list")
    if len(caps_doc) > MAX_CAPS:
        raise PolicyError("frequency_caps", f"at most {MAX_CAPS} caps")
    caps: list[FrequencyCap] = []
    for index, item in enumerate(caps_doc):
        path = f"frequency_caps[{index}]"
        cap_doc = _mapping(item, path)
        _check_keys(cap_doc, ("channel", "max", "per"), path)
        channel = cap_doc.get("channel", "any")
        if channel not in CAP_CHANNELS:
            raise PolicyError(f"{path}.channel", f"must be one of {', '.join(CAP_CHANNELS)}")
        maximum = cap_doc.get("max")
        if isinstance(maximum, bool) or not isinstance(maximum, int):
            raise PolicyError(f"{path}.max", "is required and must be an integer")
        if not 0 <= maximum <= MAX_CAP:
            raise PolicyError(f"{path}.max", f"must be between 0 and {MAX_CAP}")
        if "per" not in cap_doc:
            raise PolicyError(f"{path}.per", "is required")
        caps.append(FrequencyCap(channel, maximum, parse_period(cap_doc["per"], f"{path}.per")))
    quiet: QuietHours | None = None
    if doc.get("quiet_hours") is not None:
        quiet_doc = _mapping(doc["quiet_hours"], "quiet_hours")
        _check_keys(quiet_doc, ("start", "end", "channels"), "quiet_hours")
        for key in ("start", "end"):
            if key not in quiet_doc:
                raise PolicyError(f"quiet_hours.{key}", "is required")
        start = _clock(quiet_doc["start"], "quiet_hours.start")
        end = _clock(quiet_doc["end"], "quiet_hours.end")
        if start == end:
            raise PolicyError("quiet_hours.end", "must differ from start")
        channels = _channel_list(
            quiet_doc.get("channels", list(DEFAULT_QUIET_CHANNELS)),
            "quiet_hours.channels",
            CHANNELS,
        )
        quiet = QuietHours(start, end, channels)
    require_opt_in = _channel_list(
        doc.get("require_opt_in") or [], "require_opt_in", CONSENT_CHANNELS
    )
    return WorkspacePolicy(
        default_timezone,
        tuple(caps),
        quiet,
        require_opt_in,
        _global_control(doc.get("global_control")),
    )


def _global_control(value: Any) -> GlobalControl | None:
    """`global_control: {percent: N, salt: "..."}`, validated by the experiments module that
    also draws it, so what is stored is exactly what rules can apply."""
    if value is None:
        return None
    try:
        return parse_global_control(value, "global_control")
    except ExperimentError as error:
        raise PolicyError(error.path, error.message) from None


# --------------------------------------------------------------------------------------------
# time zones and calendar windows


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo | None:
    """The IANA zone `name`, or None when unknown or malformed."""
    if not name or len(name) > 64 or name != name.strip():
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def user_zone(*candidates: str | None) -> ZoneInfo:
    """The first valid zone among `candidates` (user trait, then workspace default), else UTC."""
    for name in candidates:
        found = zone(name) if name else None
        if found is not None:
            return found
    return ZoneInfo("UTC")


def _wall(instant: datetime, tz: ZoneInfo) -> datetime:
    return instant.astimezone(tz).replace(tzinfo=None, fold=0)


def local_instants(day: date, at: time, tz: ZoneInfo) -> list[datetime]:
    """The UTC instants at which the local wall clock reads `day at`: one normally, two in a
    DST overlap (earlier first), and in a DST gap the instant the gap ends (the first instant
    whose wall time is later than `day at`)."""
    naive = datetime.combine(day, at)
    found = sorted(
        {
            instant
            for fold in (0, 1)
            if _wall(instant := naive.replace(tzinfo=tz, fold=fold).astimezone(UTC), tz) == naive
        }
    )
    if found:
        return found
    # A gap: the two folds map to instants on either side of the transition. Search the first
    # instant whose wall time is past `naive` (transitions fall on whole seconds).
    low, high = sorted(naive.replace(tzinfo=tz, fold=f).astimezone(UTC) for f in (0, 1))
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if _wall(middle, tz) >= naive:
            high = middle
        else:
            low = middle
    return [high.replace(microsecond=0) if high.microsecond else high]


def local_start(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The first instant at which the local wall clock reads `day at` or later."""
    return local_instants(day, at, tz)[0]


def window_start(now: datetime, tz: ZoneInfo, period: Period) -> datetime:
    """The start of the calendar window of `period` that contains `now`, in zone `tz`."""
    local = now.astimezone(tz)
    if period.unit in ("d", "w"):
        back = period.count - 1 if period.unit == "d" else local.weekday() + 7 * (period.count - 1)
        return local_start(local.date() - timedelta(days=back), time(0), tz)
    step = timedelta(hours=1) if period.unit == "h" else timedelta(minutes=1)
    truncated = (
        local.replace(minute=0, second=0, microsecond=0)
        if period.unit == "h"
        else local.replace(second=0, microsecond=0)
    ).astimezone(UTC)
    # Zones with a sub-hour DST shift (Australia/Lord_Howe) can put the truncated wall time in
    # the other fold; clamp to the elapsed-time bucket then.
    if not now - step < truncated <= now:
        truncated = now - (now - datetime(2000, 1, 1, tzinfo=UTC)) % step
    return truncated - step * (period.count - 1)


def quiet_hours_end(now: datetime, tz: ZoneInfo, quiet: QuietHours) -> datetime | None:
    """When the quiet window containing `now` ends, or None if `now` is not in quiet hours."""
    local = now.astimezone(tz)
    if not quiet.contains(local.time().replace(tzinfo=None)):
        return None
    today = local.date()
    for day in (
        today - timedelta(days=1),
        today,
        today + timedelta(days=1),
        today + timedelta(days=2),
    ):
        for instant in local_instants(day, quiet.end, tz):
            if instant > now:
                return instant
    raise AssertionError("a quiet window always ends within two days")


# --------------------------------------------------------------------------------------------
# consent


@dataclass(frozen=True)
class Recipient:
    """What dispatch knows about a user at claim time (the inline projection)."""

    subscriptions: Mapping[str, str | None] = field(default_factory=dict)
    timezone: str | None = None
    undeliverable: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def subscription(self, channel: str) -> str:
        """The channel's state; never set means `subscribed` (Braze's default)."""
        return self.subscriptions.get(channel) or SUBSCRIBED


def consent_refusal(
    channel: str, kind: str, recipient: Recipient, policy: WorkspacePolicy
) -> tuple[str, str] | None:
    """(code, reason) when the user's subscription forbids this send, else None."""
    if channel not in CONSENT_CHANNELS or kind == "transactional":
        return None
    state = recipient.subscription(channel)
    if state == UNSUBSCRIBED:
        return "unsubscribed", f"user unsubscribed from {channel} ({channel}_subscribe)"
    if channel in policy.require_opt_in and state != OPTED_IN:
        return "not_opted_in", f"workspace requires {channel}_subscribe: opted_in, user is {state}"
    return None


def normalize_address(channel: str, address: str) -> str:
    """The comparable form of an address: an email's addr-spec in lower case, else stripped."""
    if channel == "email":
        return parseaddr(address)[1].strip().lower()
    if channel == "sms":
        # The same separators the SMS channel strips before its E.164 check.
        return re.sub(r"[\s().-]", "", address)
    return address.strip()


def undeliverable_refusal(
    channel: str, address: str, recipient: Recipient
) -> tuple[str, str] | None:
    """(code, reason) when the rendered address is one a provider reported as nonexistent."""
    blocked = recipient.undeliverable.get(channel, frozenset())
    if blocked and normalize_address(channel, address) in blocked:
        reason = (
            f"{channel} address previously reported undeliverable"
            " (hard bounce, unregistered token or opted out at the carrier)"
        )
        return "undeliverable", reason
    return None


# --------------------------------------------------------------------------------------------
# claim decisions


@dataclass(frozen=True)
class Contender:
    """A send of the user that is due now."""

    send_id: str
    channel: str
    kind: str
    priority: int
    decided_at: datetime
    holds_cap_slot: bool = False


@dataclass(frozen=True)
class Reservation:
    """A cap slot held by an earlier send of the user."""

    channel: str
    reserved_at: datetime


class Verdict(Enum):
    ATTEMPT = "attempt"
    HOLD = "hold"
    SUPPRESS = "suppress"


@dataclass(frozen=True)
class ClaimDecision:
    send_id: str
    verdict: Verdict
    reason: str = ""
    code: str = ""
    next_at: datetime | None = None
    reserve_cap: bool = False


def competition_key(contender: Contender) -> tuple[int, datetime, str]:
    """Who gets a scarce cap slot first: priority (high first), decided_at, send_id."""
    return (-contender.priority, contender.decided_at, contender.send_id)


def earliest_window_start(now: datetime, tz: ZoneInfo, policy: WorkspacePolicy) -> datetime | None:
    """How far back cap usage must be loaded, or None when the workspace has no caps."""
    starts = [window_start(now, tz, cap.per) for cap in policy.frequency_caps]
    return min(starts) if starts else None


def exhausted_cap(
    channel: str,
    caps: Sequence[FrequencyCap],
    used: Sequence[Reservation],
    now: datetime,
    tz: ZoneInfo,
) -> FrequencyCap | None:
    """The first cap that has no slot left for a send on `channel`, else None."""
    for cap in caps:
        if not cap.applies_to(channel):
            continue
        start = window_start(now, tz, cap.per)
        taken = sum(1 for r in used if r.reserved_at >= start and cap.applies_to(r.channel))
        if taken >= cap.max:
            return cap
    return None


def decide_claims(
    contenders: Sequence[Contender],
    *,
    recipient: Recipient,
    policy: WorkspacePolicy,
    reservations: Sequence[Reservation],
    now: datetime,
    tz: ZoneInfo,
) -> list[ClaimDecision]:
    """Decide every due send of one user, in competition order."""
    used = list(reservations)
    decisions: list[ClaimDecision] = []
    for contender in sorted(contenders, key=competition_key):
        refusal = consent_refusal(contender.channel, contender.kind, recipient, policy)
        if refusal is not None:
            code, reason = refusal
            decisions.append(ClaimDecision(contender.send_id, Verdict.SUPPRESS, reason, code))
            continue
        if contender.kind == "transactional":
            decisions.append(ClaimDecision(contender.send_id, Verdict.ATTEMPT))
            continue
        quiet = policy.quiet_hours
        if quiet is not None and contender.channel in quiet.channels:
            end = quiet_hours_end(now, tz, quiet)
            if end is not None:
                local_end = end.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")
                reason = f"held for quiet hours until {local_end} ({tz.key})"
                decisions.append(
                    ClaimDecision(contender.send_id, Verdict.HOLD, reason, "quiet_hours", end)
                )
                continue
        if contender.holds_cap_slot:
            decisions.append(ClaimDecision(contender.send_id, Verdict.ATTEMPT))
            continue
        cap = exhausted_cap(contender.channel, policy.frequency_caps, used, now, tz)
        if cap is not None:
            reason = f"frequency cap: {cap.describe()} ({tz.key})"
            decisions.append(
                ClaimDecision(contender.send_id, Verdict.SUPPRESS, reason, "frequency_cap")
            )
            continue
        # Every marketing send takes a slot, caps or not, so a cap applied later counts the
        # sends already made in its window.
        used.append(Reservation(contender.channel, now))
        decisions.append(ClaimDecision(contender.send_id, Verdict.ATTEMPT, reserve_cap=True))
    return decisions
