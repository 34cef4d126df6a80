"""The pure core of the rules service: campaign definitions, engagement state, decisions, ids.

Standard library only, no I/O. CEL expressions are held here as source text; compiling and
evaluating them lives in `services.rules.cel`, and the orchestration that needs both lives in
`services.rules.evaluation`.

Time. Every time in the engagement state is the server's `received_at` (stamped by the database
clock, the one time authority; RELIABILITY.md P5). Client `occurred_at` is arbitrary (offline
buffering, wrong device clocks), so it is kept on the event for analytics and templates but never
decides a window, a first/last time or a due time. `received_at` is also what makes replay equal
live: it is stored with the event, so folding the same events in the same order gives the same
state whenever it is done.

Windows. Per event name the state keeps daily buckets (UTC date of `received_at` → count and sums)
for the last `RETENTION_DAYS` days. A rolling window `last_Nd` seen at `now` sums the buckets of the
N most recent UTC calendar days, today included: its granularity is one day, so it reaches back
between N-1 and N days (an event 8 days ago is in `last_30d`, never in `last_7d`; an event 6½ days
ago is in `last_7d` only if it fell on one of the last 7 UTC dates). Buckets are pruned only when a
new day starts for that event name, relative to the newest `received_at` of the user, so pruning
depends on the events alone and replay equals live. Lifetime counts and sums never expire.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

if TYPE_CHECKING:  # experiments imports this module's duration syntax; parsed lazily below
    from services.rules.experiments import Conversion, Experiment

# --------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------

MAX_DURATION: Final = timedelta(days=3650)
_DURATION = re.compile(r"^([0-9]{1,9})([smhd])$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class DurationError(ValueError):
    """A duration string is not `<digits><s|m|h|d>` within `MAX_DURATION`."""

    def __init__(self, text: object, message: str) -> None:
        super().__init__(f"{text!r}: {message}")
        self.text = text
        self.message = message


def parse_duration(text: str) -> timedelta:
    """Parse `0s`, `90s`, `15m`, `1h`, `14d` (one non-negative integer and one unit)."""
    if not isinstance(text, str):
        raise DurationError(text, "expected a duration string such as '90s', '15m', '1h' or '14d'")
    match = _DURATION.match(text)
    if match is None:
        raise DurationError(text, "expected a duration such as '90s', '15m', '1h' or '14d'")
    value = timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    if value > MAX_DURATION:
        raise DurationError(text, f"is longer than {MAX_DURATION.days}d")
    return value


def format_duration(value: timedelta) -> str:
    """The canonical text of a whole-second duration: the largest unit that divides it exactly."""
    if value.microseconds or value < timedelta(0):
        raise DurationError(value, "only non-negative whole seconds have a duration text")
    seconds = value.days * 86400 + value.seconds
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# --------------------------------------------------------------------------------------------
# Campaign definitions
# --------------------------------------------------------------------------------------------

CAMPAIGN_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
EVENT_NAME = re.compile(r"^\$?[A-Za-z0-9_.:\- ]{1,128}$")
PROPERTY_NAME = re.compile(r"^[A-Za-z0-9_.:\-$]{1,128}$")
CHANNELS: Final = ("email", "webhook", "push", "sms", "console")
MAX_NAME_CHARS = 200
MAX_EXPRESSION_CHARS = 4096
MAX_TEMPLATE_CHARS = 100_000
MAX_EXCEPTIONS = 32
MAX_BRANCHES = 16

Channel: TypeAlias = Literal["email", "webhook", "push", "sms", "console"]
CampaignStatus: TypeAlias = Literal["active", "paused"]
CampaignKind: TypeAlias = Literal["marketing", "transactional"]

_REQUIRED_BY_CHANNEL: Final[Mapping[str, tuple[str, ...]]] = {
    "email": ("to", "subject", "body"),
    "sms": ("to", "body"),
    "push": ("to", "body"),
    "webhook": ("url",),
    "console": ("body",),
}
_TEMPLATE_FIELDS: Final = ("to", "subject", "body", "html", "url")


class CampaignError(ValueError):
    """A campaign definition is invalid; `path` names the field (`messages[1].message.channel`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class Message:
    """What to send, as Liquid templates rendered by dispatch. `payload` is a JSON object."""

    channel: Channel
    to: str | None = None
    subject: str | None = None
    body: str | None = None
    html: str | None = None
    url: str | None = None
    payload: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"channel": self.channel}
        for name in _TEMPLATE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.payload is not None:
            out["payload"] = _json_copy(self.payload)
        return out

    def templates(self) -> tuple[str, ...]:
        """Every template text of the message (fields and the string leaves of the payload)."""
        texts = [t for t in (self.to, self.subject, self.body, self.html, self.url) if t]
        if self.payload is not None:
            texts.extend(_string_leaves(self.payload))
        return tuple(texts)


@dataclass(frozen=True, slots=True)
class MessageBranch:
    """One candidate message; the first branch whose `when` (CEL) is true is sent."""

    message: Message
    when: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.when is not None:
            out["when"] = self.when
        out["message"] = self.message.to_dict()
        return out


@dataclass(frozen=True, slots=True)
class ActionTrigger:
    """An event named `event`, optionally filtered by the CEL `where` (variables: event, user)."""

    event: str
    where: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.event}
        if self.where is not None:
            out["where"] = self.where
        return out


@dataclass(frozen=True, slots=True)
class InactivityTrigger:
    """No `event` for `duration` (YAML `for`); every new `event` re-arms the check."""

    event: str
    duration: timedelta

    def to_dict(self) -> dict[str, Any]:
        return {"inactivity": {"event": self.event, "for": format_duration(self.duration)}}


@dataclass(frozen=True, slots=True)
class AfterFirstTrigger:
    """`offset` after the first occurrence of `event`, once."""

    event: str
    offset: timedelta

    def to_dict(self) -> dict[str, Any]:
        return {"after_first": {"event": self.event, "offset": format_duration(self.offset)}}


@dataclass(frozen=True, slots=True)
class ThresholdTrigger:
    """Fires when the CEL `condition` on user state becomes true (an edge, not a level)."""

    condition: str

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.condition}


Trigger: TypeAlias = ActionTrigger | InactivityTrigger | AfterFirstTrigger | ThresholdTrigger


@dataclass(frozen=True, slots=True)
class ExceptionRule:
    """An `event` that cancels the pending message; `match` (CEL: exception, trigger, user)
    restricts it to the pending instances it is correlated with."""

    event: str
    match: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.event}
        if self.match is not None:
            out["match"] = self.match
        return out


@dataclass(frozen=True, slots=True)
class CampaignDefinition:
    """A normalized campaign definition. `reeligibility` None means at most once per user, ever.

    `to_dict()` is the canonical stored form (defaults filled in, a plain `message:` becomes one
    `messages` branch, durations in canonical text), so `parse_campaign(d.to_dict()) == d`.
    """

    id: str
    name: str
    trigger: Trigger
    messages: tuple[MessageBranch, ...]
    delay: timedelta = timedelta(0)
    audience: str | None = None
    exceptions: tuple[ExceptionRule, ...] = ()
    reeligibility: timedelta | None = None
    status: CampaignStatus = "active"
    kind: CampaignKind = "marketing"
    priority: int = 0
    correlation_key: str | None = None
    experiment: Experiment | None = None
    conversion: Conversion | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "kind": self.kind,
            "priority": self.priority,
            "trigger": self.trigger.to_dict(),
            "delay": format_duration(self.delay),
        }
        if self.audience is not None:
            out["audience"] = self.audience
        if self.exceptions:
            out["exceptions"] = [rule.to_dict() for rule in self.exceptions]
        if self.reeligibility is not None:
            out["reeligibility"] = format_duration(self.reeligibility)
        if self.correlation_key is not None:
            out["correlation_key"] = self.correlation_key
        out["messages"] = [branch.to_dict() for branch in self.messages]
        if self.experiment is not None:
            out["experiment"] = self.experiment.to_dict()
        if self.conversion is not None:
            out["conversion"] = self.conversion.to_dict()
        return out

    def definition_hash(self) -> str:
        """sha256 (hex) of the canonical JSON of `to_dict()` without `status`.

        Pausing or resuming is an operational switch, not an edit: it must not create a new
        version (pending instances keep their version and simply wait while paused).
        """
        content = self.to_dict()
        del content["status"]
        return hashlib.sha256(canonical_json(content)).hexdigest()

    def expressions(self) -> tuple[tuple[str, str], ...]:
        """Every CEL expression as `(field path, source)`, in definition order."""
        found: list[tuple[str, str]] = []
        if isinstance(self.trigger, ActionTrigger) and self.trigger.where is not None:
            found.append(("trigger.where", self.trigger.where))
        if isinstance(self.trigger, ThresholdTrigger):
            found.append(("trigger.threshold", self.trigger.condition))
        if self.audience is not None:
            found.append(("audience", self.audience))
        for index, rule in enumerate(self.exceptions):
            if rule.match is not None:
                found.append((f"exceptions[{index}].match", rule.match))
        for index, branch in enumerate(self.messages):
            if branch.when is not None:
                found.append((f"messages[{index}].when", branch.when))
        if self.conversion is not None and self.conversion.match is not None:
            found.append(("conversion.match", self.conversion.match))
        return tuple(found)

    def analysis_horizon(self) -> timedelta | None:
        """How long after entry an entered user's outcome is final, the same for every group:
        the longest delay of any group (control: the campaign's) plus `conversion.within`;
        None without a conversion goal.

        Comparing groups whose delays differ by conversions counted from each group's own send
        is biased: a user who buys before a long delay ends is cancelled by the exception and
        never counted, so the long-delay arm looks worse whatever the message does. The stats
        count a conversion anywhere in `[entered_at, entered_at + horizon)` (intention to
        treat); see docs/experiments.md.
        """
        if self.conversion is None:
            return None
        delays = [self.delay]
        if self.experiment is not None:
            delays.extend(v.delay for v in self.experiment.variants if v.delay is not None)
        return max(delays) + self.conversion.within

    def referenced_event_names(self) -> frozenset[str]:
        """Event names the definition itself names (trigger, exceptions, conversion)."""
        names = {rule.event for rule in self.exceptions}
        if self.conversion is not None:
            names.add(self.conversion.event)
        if not isinstance(self.trigger, ThresholdTrigger):
            names.add(self.trigger.event)
        return frozenset(names)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same value always gives the same bytes."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


_TOP_LEVEL_KEYS: Final = frozenset(
    {
        "id",
        "name",
        "trigger",
        "audience",
        "delay",
        "exceptions",
        "reeligibility",
        "message",
        "messages",
        "status",
        "kind",
        "priority",
        "correlation_key",
        "experiment",
        "conversion",
    }
)


def parse_campaign(doc: Mapping[str, Any]) -> CampaignDefinition:
    """Validate a YAML-shaped campaign (as from `yaml.safe_load`) into a definition.

    Raises `CampaignError(path, message)`. Unknown keys are errors at every level.
    """
    if not isinstance(doc, Mapping):
        raise CampaignError("", "a campaign must be a mapping")
    _check_keys(doc, _TOP_LEVEL_KEYS, "")
    campaign_id = _string(doc, "id", "", required=True, max_chars=63)
    assert campaign_id is not None
    if not CAMPAIGN_ID.match(campaign_id):
        raise CampaignError("id", "must match ^[a-z0-9][a-z0-9_-]{0,62}$")
    name = _string(doc, "name", "", max_chars=MAX_NAME_CHARS) or campaign_id
    trigger = _parse_trigger(doc.get("trigger"), "trigger")
    delay = _duration(doc, "delay", "") or timedelta(0)
    audience = _expression(doc, "audience", "")
    exceptions = _parse_exceptions(doc.get("exceptions"), "exceptions")
    reeligibility = _duration(doc, "reeligibility", "")
    messages = _parse_messages(doc)
    status = _choice(doc, "status", ("active", "paused"), "active")
    kind = _choice(doc, "kind", ("marketing", "transactional"), "marketing")
    priority = doc.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise CampaignError("priority", "must be an integer")
    if not -1000 <= priority <= 1000:
        raise CampaignError("priority", "must be between -1000 and 1000")
    correlation_key = _string(doc, "correlation_key", "", max_chars=128)
    if correlation_key is not None:
        if not PROPERTY_NAME.match(correlation_key):
            raise CampaignError("correlation_key", "must be a property name of the trigger event")
        if not isinstance(trigger, ActionTrigger):
            raise CampaignError("correlation_key", "is only supported with an action trigger")
    from services.rules.experiments import ExperimentError, parse_blocks

    try:
        blocks = parse_blocks(doc)
    except ExperimentError as error:
        raise CampaignError(error.path, error.message) from None
    if blocks.experiment is not None and kind == "transactional":
        raise CampaignError(
            "experiment", "transactional campaigns cannot hold users out or split them"
        )
    return CampaignDefinition(
        id=campaign_id,
        name=name,
        trigger=trigger,
        messages=messages,
        delay=delay,
        audience=audience,
        exceptions=exceptions,
        reeligibility=reeligibility,
        status=status,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        priority=priority,
        correlation_key=correlation_key,
        experiment=blocks.experiment,
        conversion=blocks.conversion,
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_keys(doc: Mapping[Any, Any], allowed: Iterable[str], path: str) -> None:
    allowed_set = frozenset(allowed)
    for key in doc:
        if not isinstance(key, str):
            raise CampaignError(path, f"keys must be strings, got {key!r}")
        if key not in allowed_set:
            expected = ", ".join(sorted(allowed_set))
            raise CampaignError(_join(path, key), f"unknown field (expected one of: {expected})")


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CampaignError(path, "must be a mapping")
    return value


def _string(
    doc: Mapping[str, Any], key: str, path: str, *, required: bool = False, max_chars: int
) -> str | None:
    here = _join(path, key)
    if key not in doc or doc[key] is None:
        if required:
            raise CampaignError(here, "is required")
        return None
    value = doc[key]
    if not isinstance(value, str):
        raise CampaignError(here, f"must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise CampaignError(here, "must not be empty")
    if len(value) > max_chars:
        raise CampaignError(here, f"is longer than {max_chars} characters")
    return value


def _event_name(doc: Mapping[str, Any], key: str, path: str) -> str:
    name = _string(doc, key, path, required=True, max_chars=129)
    assert name is not None
    if not EVENT_NAME.match(name):
        raise CampaignError(_join(path, key), "is not a valid event name")
    return name


def _expression(doc: Mapping[str, Any], key: str, path: str) -> str | None:
    return _string(doc, key, path, max_chars=MAX_EXPRESSION_CHARS)


def _duration(doc: Mapping[str, Any], key: str, path: str) -> timedelta | None:
    if key not in doc or doc[key] is None:
        return None
    try:
        return parse_duration(doc[key])
    except DurationError as error:
        raise CampaignError(_join(path, key), error.message) from None


def _choice(doc: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = doc.get(key, default)
    if value not in choices:
        raise CampaignError(key, f"must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _parse_trigger(value: Any, path: str) -> Trigger:
    if value is None:
        raise CampaignError(path, "is required")
    doc = _mapping(value, path)
    kinds = [k for k in ("event", "inactivity", "after_first", "threshold") if k in doc]
    if len(kinds) != 1:
        raise CampaignError(
            path,
            "needs exactly one of: event (with optional where), inactivity, after_first, threshold",
        )
    kind = kinds[0]
    if kind == "event":
        _check_keys(doc, ("event", "where"), path)
        return ActionTrigger(
            event=_event_name(doc, "event", path), where=_expression(doc, "where", path)
        )
    _check_keys(doc, (kind,), path)
    if kind == "threshold":
        condition = _string(doc, "threshold", path, required=True, max_chars=MAX_EXPRESSION_CHARS)
        assert condition is not None
        return ThresholdTrigger(condition=condition)
    inner_path = _join(path, kind)
    inner = _mapping(doc[kind], inner_path)
    time_key = "for" if kind == "inactivity" else "offset"
    _check_keys(inner, ("event", time_key), inner_path)
    event = _event_name(inner, "event", inner_path)
    span = _duration(inner, time_key, inner_path)
    if span is None:
        raise CampaignError(_join(inner_path, time_key), "is required")
    if kind == "inactivity":
        if span <= timedelta(0):
            raise CampaignError(_join(inner_path, "for"), "must be longer than 0s")
        return InactivityTrigger(event=event, duration=span)
    return AfterFirstTrigger(event=event, offset=span)


def _parse_exceptions(value: Any, path: str) -> tuple[ExceptionRule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise CampaignError(path, "must be a list")
    if len(value) > MAX_EXCEPTIONS:
        raise CampaignError(path, f"has more than {MAX_EXCEPTIONS} entries")
    rules = []
    for index, item in enumerate(value):
        here = f"{path}[{index}]"
        doc = _mapping(item, here)
        _check_keys(doc, ("event", "match"), here)
        rules.append(
            ExceptionRule(
                event=_event_name(doc, "event", here), match=_expression(doc, "match", here)
            )
        )
    return tuple(rules)


def _parse_messages(doc: Mapping[str, Any]) -> tuple[MessageBranch, ...]:
    if ("message" in doc) == ("messages" in doc):
        raise CampaignError("messages", "give exactly one of message or messages")
    if "message" in doc:
        return (MessageBranch(message=_parse_message(doc["message"], "message")),)
    value = doc["messages"]
    if not isinstance(value, list) or not value:
        raise CampaignError("messages", "must be a non-empty list")
    if len(value) > MAX_BRANCHES:
        raise CampaignError("messages", f"has more than {MAX_BRANCHES} branches")
    branches = []
    for index, item in enumerate(value):
        here = f"messages[{index}]"
        branch = _mapping(item, here)
        _check_keys(branch, ("when", "message"), here)
        if "message" not in branch:
            raise CampaignError(f"{here}.message", "is required")
        branches.append(
            MessageBranch(
                message=_parse_message(branch["message"], f"{here}.message"),
                when=_expression(branch, "when", here),
            )
        )
    return tuple(branches)


def override_messages(
    branches: tuple[MessageBranch, ...], overrides: Mapping[str, Any], path: str
) -> tuple[MessageBranch, ...]:
    """`branches` with `overrides` (message fields, as an experiment variant gives them)
    replacing the fields of every branch's message; each result is validated as a message
    (errors name `path`)."""
    if not overrides:
        return branches
    return tuple(
        MessageBranch(
            message=_parse_message({**branch.message.to_dict(), **overrides}, path),
            when=branch.when,
        )
        for branch in branches
    )


def _parse_message(value: Any, path: str) -> Message:
    doc = _mapping(value, path)
    _check_keys(doc, ("channel", *_TEMPLATE_FIELDS, "payload"), path)
    channel = doc.get("channel")
    if channel is None:
        raise CampaignError(_join(path, "channel"), "is required")
    if channel not in CHANNELS:
        raise CampaignError(
            _join(path, "channel"), f"must be one of {', '.join(CHANNELS)}, got {channel!r}"
        )
    texts = {
        name: _string(doc, name, path, max_chars=MAX_TEMPLATE_CHARS) for name in _TEMPLATE_FIELDS
    }
    for name in _REQUIRED_BY_CHANNEL[channel]:
        if texts[name] is None:
            raise CampaignError(_join(path, name), f"is required for the {channel} channel")
    payload = doc.get("payload")
    if payload is not None:
        payload = _json_object(payload, _join(path, "payload"))
    return Message(
        channel=channel,
        to=texts["to"],
        subject=texts["subject"],
        body=texts["body"],
        html=texts["html"],
        url=texts["url"],
        payload=payload,
    )


def _json_object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise CampaignError(path, "must be a mapping")
    return _json_value(value, path, 0)  # type: ignore[no-any-return]


def _json_value(value: Any, path: str, depth: int) -> Any:
    if depth > 16:
        raise CampaignError(path, "is nested too deeply")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CampaignError(path, "must be a finite number")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CampaignError(path, f"keys must be strings, got {key!r}")
            out[key] = _json_value(item, f"{path}.{key}", depth + 1)
        return out
    if isinstance(value, list):
        return [_json_value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise CampaignError(path, f"is not a JSON value ({type(value).__name__})")


def _json_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _json_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_copy(item) for item in value]
    return value


def _string_leaves(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _string_leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _string_leaves(item)


# --------------------------------------------------------------------------------------------
# Recorded events and the engagement state
# --------------------------------------------------------------------------------------------

IDENTIFY_EVENT: Final = "$identify"
OUTCOME_EVENT_PREFIX: Final = "message."
RETENTION_DAYS: Final = 90
WINDOWS: Final[tuple[tuple[str, int], ...]] = (
    ("last_1d", 1),
    ("last_7d", 7),
    ("last_30d", 30),
    ("last_90d", 90),
)
MAX_SUMMED_PROPERTIES: Final = 32
STATE_FORMAT: Final = 1


class StateError(ValueError):
    """An event cannot be folded into this state (another user, or a naive timestamp)."""


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as read from the store. Times are timezone-aware; `received_at` is server time."""

    workspace_id: str
    user_id: str
    event_id: str
    name: str
    occurred_at: datetime
    received_at: datetime
    properties: Mapping[str, Any]
    global_position: int


@dataclass(frozen=True, slots=True)
class DayBucket:
    """Events of one name received on one UTC date (`day` is `date.toordinal()`)."""

    day: int
    count: int
    sums: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class EventStats:
    """Lifetime and daily aggregates of one event name for one user.

    `sums` holds the lifetime sum of every numeric top-level property (at most
    `MAX_SUMMED_PROPERTIES` names, the first ones seen). `days` is ordered by day and holds at most
    `RETENTION_DAYS` days ending at the newest `received_at` of the user when this name was last
    folded.
    """

    count: int
    first_at: datetime
    last_at: datetime
    sums: Mapping[str, float]
    days: tuple[DayBucket, ...]


@dataclass(frozen=True, slots=True)
class UserState:
    """The engagement state of one user, folded from their events by `evolve`.

    Immutable by convention: mappings are plain dicts (for speed and for CEL), never mutated after
    the state is built; `evolve` copies only what an event touches.

    `first_seen`/`last_seen` are the first/last `received_at` of a behavioural event: `$`-prefixed
    system events (`$identify`) and delivery outcomes (`message.*`) are not the user being active.
    `events` aggregates every name except `$`-prefixed ones (outcomes are countable:
    `user.events['message.sent'].last_1d.count`). `newest_received_at` is the newest time of any
    folded event; bucket retention is relative to it, so pruning depends only on the events.
    """

    workspace_id: str
    user_id: str
    traits: Mapping[str, Any]
    timezone: str | None
    first_seen: datetime | None
    last_seen: datetime | None
    newest_received_at: datetime
    events: Mapping[str, EventStats]
    event_count: int


def evolve(state: UserState | None, event: RecordedEvent) -> UserState:
    """Fold one event into the state (O(size of the event), plus O(days) once per name and day)."""
    received = event.received_at
    if received.tzinfo is None:
        raise StateError(f"event {event.event_id!r} has a naive received_at")
    if received.tzinfo is not UTC:
        received = received.astimezone(UTC)
    if state is None:
        traits: Mapping[str, Any] = {}
        tz: str | None = None
        first_seen = last_seen = None
        newest = received
        events: Mapping[str, EventStats] = {}
        count = 0
    else:
        if state.user_id != event.user_id or state.workspace_id != event.workspace_id:
            raise StateError(
                f"event {event.event_id!r} of {event.workspace_id}/{event.user_id} "
                f"folded into the state of {state.workspace_id}/{state.user_id}"
            )
        traits = state.traits
        tz = state.timezone
        first_seen = state.first_seen
        last_seen = state.last_seen
        newest = state.newest_received_at
        if received > newest:
            newest = received
        events = state.events
        count = state.event_count
    name = event.name
    if name.startswith("$"):
        if name == IDENTIFY_EVENT:
            traits, tz = _merge_traits(traits, tz, event.properties)
    else:
        if not name.startswith(OUTCOME_EVENT_PREFIX):
            if first_seen is None or received < first_seen:
                first_seen = received
            if last_seen is None or received > last_seen:
                last_seen = received
        events = dict(events)
        events[name] = _fold_stats(events.get(name), received, event.properties, newest)
    return UserState(
        workspace_id=event.workspace_id,
        user_id=event.user_id,
        traits=traits,
        timezone=tz,
        first_seen=first_seen,
        last_seen=last_seen,
        newest_received_at=newest,
        events=events,
        event_count=count + 1,
    )


def fold(state: UserState | None, events: Iterable[RecordedEvent]) -> UserState | None:
    """Fold events in order (what replay does)."""
    for event in events:
        state = evolve(state, event)
    return state


_NO_SUMS: Final[dict[str, float]] = {}  # shared by every sum-less bucket; never mutated
_MAX_SUMMABLE_INT: Final = 2**63


def _sum_numbers(
    sums: Mapping[str, float], properties: Mapping[str, Any]
) -> tuple[Mapping[str, float], list[tuple[str, float]] | None]:
    """Add the numeric top-level properties to `sums` (copy-on-write). Returns the new sums and
    the (name, value) pairs counted, None when there were none."""
    tracked: list[tuple[str, float]] | None = None
    out = sums
    for key, value in properties.items():
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                continue
            number = value
        elif kind is int:
            if not -_MAX_SUMMABLE_INT <= value <= _MAX_SUMMABLE_INT:
                continue
            number = float(value)
        else:
            continue
        if key not in out and len(out) >= MAX_SUMMED_PROPERTIES:
            continue
        if out is sums:
            out = dict(sums)
        out[key] = out.get(key, 0.0) + number  # type: ignore[index]
        if tracked is None:
            tracked = []
        tracked.append((key, number))
    return out, tracked


def _fold_stats(
    stats: EventStats | None, received: datetime, properties: Mapping[str, Any], newest: datetime
) -> EventStats:
    day = received.toordinal()
    if stats is None:
        sums, tracked = _sum_numbers(_NO_SUMS, properties) if properties else (_NO_SUMS, None)
        days: tuple[DayBucket, ...] = ()
        if day > newest.toordinal() - RETENTION_DAYS:
            days = (DayBucket(day, 1, sums),)
        return EventStats(1, received, received, sums, days)
    sums, tracked = _sum_numbers(stats.sums, properties) if properties else (stats.sums, None)
    first_at = received if received < stats.first_at else stats.first_at
    last_at = received if received > stats.last_at else stats.last_at
    return EventStats(
        stats.count + 1, first_at, last_at, sums, _fold_days(stats.days, day, tracked, newest)
    )


def _add_to_bucket(bucket: DayBucket, tracked: list[tuple[str, float]] | None) -> DayBucket:
    if tracked is None:
        return DayBucket(bucket.day, bucket.count + 1, bucket.sums)
    sums = dict(bucket.sums)
    for key, value in tracked:
        sums[key] = sums.get(key, 0.0) + value
    return DayBucket(bucket.day, bucket.count + 1, sums)


def _fold_days(
    days: tuple[DayBucket, ...],
    day: int,
    tracked: list[tuple[str, float]] | None,
    newest: datetime,
) -> tuple[DayBucket, ...]:
    cutoff = newest.toordinal() - RETENTION_DAYS  # buckets must be newer than this day
    if days and days[-1].day == day:
        return (*days[:-1], _add_to_bucket(days[-1], tracked))
    if day <= cutoff:
        return _prune(days, cutoff)
    bucket = DayBucket(day, 1, _NO_SUMS if tracked is None else dict(tracked))
    if not days or days[-1].day < day:
        # A new day: the only moment old buckets can fall out, so prune here (<= RETENTION_DAYS).
        return _prune((*days, bucket), cutoff)
    # received_at earlier than the newest bucket (commit order differs from clock order): rare.
    by_day = {b.day: b for b in days}
    existing = by_day.get(day)
    by_day[day] = bucket if existing is None else _add_to_bucket(existing, tracked)
    return _prune(tuple(by_day[d] for d in sorted(by_day)), cutoff)


def _prune(days: tuple[DayBucket, ...], cutoff: int) -> tuple[DayBucket, ...]:
    if not days or days[0].day > cutoff:
        return days
    return tuple(b for b in days if b.day > cutoff)


def _merge_traits(
    traits: Mapping[str, Any], tz: str | None, changes: Mapping[str, Any]
) -> tuple[Mapping[str, Any], str | None]:
    """Shallow merge: each top-level key replaces the trait; a null value deletes it."""
    merged = dict(traits)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    if "timezone" in changes:
        candidate = merged.get("timezone")
        tz = candidate if isinstance(candidate, str) and valid_timezone(candidate) else None
    return merged, tz


@lru_cache(maxsize=1024)
def valid_timezone(name: str) -> bool:
    """Whether `name` is an IANA time zone known to this Python (`Europe/Berlin`)."""
    if not name or len(name) > 64:
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Storage form (jsonb) of the state
# --------------------------------------------------------------------------------------------


def state_to_dict(state: UserState) -> dict[str, Any]:
    """A JSON-safe dict (timestamps ISO 8601, days ISO dates) that `state_from_dict` inverts."""
    return {
        "format": STATE_FORMAT,
        "workspace_id": state.workspace_id,
        "user_id": state.user_id,
        "traits": _json_copy(state.traits),
        "timezone": state.timezone,
        "first_seen": _iso(state.first_seen),
        "last_seen": _iso(state.last_seen),
        "newest_received_at": state.newest_received_at.isoformat(),
        "event_count": state.event_count,
        "events": {
            name: {
                "count": stats.count,
                "first_at": stats.first_at.isoformat(),
                "last_at": stats.last_at.isoformat(),
                "sums": dict(stats.sums),
                "days": [
                    [date.fromordinal(b.day).isoformat(), b.count, dict(b.sums)] for b in stats.days
                ],
            }
            for name, stats in state.events.items()
        },
    }


def state_from_dict(doc: Mapping[str, Any]) -> UserState:
    """Inverse of `state_to_dict`."""
    if doc.get("format") != STATE_FORMAT:
        raise StateError(f"unknown user state format {doc.get('format')!r}")
    return UserState(
        workspace_id=doc["workspace_id"],
        user_id=doc["user_id"],
        traits=dict(doc["traits"]),
        timezone=doc["timezone"],
        first_seen=_parse_time(doc["first_seen"]),
        last_seen=_parse_time(doc["last_seen"]),
        newest_received_at=_time(doc["newest_received_at"]),
        event_count=int(doc["event_count"]),
        events={
            name: EventStats(
                count=int(stats["count"]),
                first_at=_time(stats["first_at"]),
                last_at=_time(stats["last_at"]),
                sums={key: float(value) for key, value in stats["sums"].items()},
                days=tuple(
                    DayBucket(
                        date.fromisoformat(day).toordinal(),
                        int(count),
                        {key: float(value) for key, value in sums.items()},
                    )
                    for day, count, sums in stats["days"]
                ),
            )
            for name, stats in doc["events"].items()
        },
    )


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise StateError(f"naive timestamp {text!r} in stored state")
    return value.astimezone(UTC)


def _parse_time(text: str | None) -> datetime | None:
    return None if text is None else _time(text)


# --------------------------------------------------------------------------------------------
# The view CEL expressions and templates see
# --------------------------------------------------------------------------------------------

Lifecycle: TypeAlias = Literal["onboarding", "active", "whale", "lapsed"]


@dataclass(frozen=True, slots=True)
class LifecyclePolicy:
    """How `user.lifecycle` is derived; the defaults are the documented product defaults.

    Checked in order: `lapsed` (active before, but no behavioural event for `lapsed_after`),
    `whale` (sum of `whale_property` of `whale_event` over the last `whale_window_days` days ≥
    `whale_min_sum`), `onboarding` (first seen less than `onboarding_for` ago, or never active),
    else `active`.
    """

    lapsed_after: timedelta = timedelta(days=14)
    whale_event: str = "purchase"
    whale_property: str = "amount"
    whale_window_days: int = 30
    whale_min_sum: float = 500.0
    onboarding_for: timedelta = timedelta(days=7)

    def __post_init__(self) -> None:
        if not 1 <= self.whale_window_days <= RETENTION_DAYS:
            raise ValueError(f"whale_window_days must be within 1..{RETENTION_DAYS}")


DEFAULT_LIFECYCLE: Final = LifecyclePolicy()


def lifecycle(
    state: UserState, now: datetime, policy: LifecyclePolicy = DEFAULT_LIFECYCLE
) -> Lifecycle:
    """The lifecycle stage of the user at `now` (see `LifecyclePolicy`)."""
    if state.last_seen is not None and now - state.last_seen >= policy.lapsed_after:
        return "lapsed"
    stats = state.events.get(policy.whale_event)
    if stats is not None and policy.whale_min_sum <= _window_sum(
        stats, now.astimezone(UTC).toordinal(), policy.whale_window_days, policy.whale_property
    ):
        return "whale"
    if state.first_seen is None or now - state.first_seen < policy.onboarding_for:
        return "onboarding"
    return "active"


def _window_sum(stats: EventStats, today: int, days: int, prop: str) -> float:
    oldest = today - days
    total = 0.0
    for bucket in reversed(stats.days):
        if bucket.day <= oldest:
            break
        if bucket.day <= today:
            total += bucket.sums.get(prop, 0.0)
    return total


def window_counts(stats: EventStats, now: datetime) -> dict[str, tuple[int, dict[str, float]]]:
    """Count and sums per window (`last_1d` … `last_90d`) at `now`, from the daily buckets."""
    today = now.astimezone(UTC).toordinal()
    out: dict[str, tuple[int, dict[str, float]]] = {}
    count = 0
    sums: dict[str, float] = {}
    buckets = reversed(stats.days)
    pending = next(buckets, None)
    for window, size in WINDOWS:
        oldest = today - size
        while pending is not None and pending.day > oldest:
            if pending.day <= today:
                count += pending.count
                for key, value in pending.sums.items():
                    sums[key] = sums.get(key, 0.0) + value
            pending = next(buckets, None)
        out[window] = (count, dict(sums))
    return out


def cel_view(
    state: UserState,
    now: datetime,
    referenced_event_names: Iterable[str] | None = None,
    *,
    sum_properties: Iterable[str] = (),
    policy: LifecyclePolicy = DEFAULT_LIFECYCLE,
) -> dict[str, Any]:
    """The user as CEL expressions and templates see it (`user.…`), at `now`.

    Plain dicts, lists, str, int, float, bool and None only (cel-expr-python accepts nothing
    else); timestamps are ISO 8601 strings (`timestamp(user.last_seen)` in CEL).

    `events` holds the `referenced_event_names` (all names of the user when None), with a zero
    entry (`count` 0, times null) for names the user never did, so
    `user.events['feature_x_used'].count == 0` is true rather than an error. Each `sum` map
    (lifetime and per window) also holds 0.0 for every name in `sum_properties` it lacks. Only
    pass what expressions reference: CEL converts each map it indexes in full, so the view's size
    is the evaluation's cost.
    """
    names: Iterable[str] = (
        state.events.keys() if referenced_event_names is None else referenced_event_names
    )
    zero_sums = dict.fromkeys(sum_properties, 0.0)
    events: dict[str, Any] = {}
    for name in names:
        stats = state.events.get(name)
        events[name] = _event_view(stats, now, zero_sums)
    return {
        "id": state.user_id,
        "traits": state.traits,
        "first_seen": _iso(state.first_seen),
        "last_seen": _iso(state.last_seen),
        "timezone": state.timezone,
        "lifecycle": lifecycle(state, now, policy),
        "events": events,
    }


def zero_event_view(sum_properties: Iterable[str] = ()) -> dict[str, Any]:
    """`user.events[NAME]` for an event the user never did (what `cel_view` puts for a
    referenced name): count 0, times null, zero sums."""
    return _event_view(None, datetime.min, dict.fromkeys(sum_properties, 0.0))


def _with_zeros(sums: Mapping[str, float], zeros: dict[str, float]) -> dict[str, float]:
    if not zeros:
        return dict(sums)
    out = dict(zeros)
    out.update(sums)
    return out


def _event_view(stats: EventStats | None, now: datetime, zeros: dict[str, float]) -> dict[str, Any]:
    if stats is None:
        view: dict[str, Any] = {
            "count": 0,
            "first_at": None,
            "last_at": None,
            "sum": dict(zeros),
        }
        for window, _ in WINDOWS:
            view[window] = {"count": 0, "sum": dict(zeros)}
        return view
    view = {
        "count": stats.count,
        "first_at": stats.first_at.isoformat(),
        "last_at": stats.last_at.isoformat(),
        "sum": _with_zeros(stats.sums, zeros),
    }
    for window, (count, sums) in window_counts(stats, now).items():
        view[window] = {"count": count, "sum": _with_zeros(sums, zeros)}
    return view


def event_view(event: RecordedEvent) -> dict[str, Any]:
    """The event as CEL and templates see it (`event.…`, `trigger.…`, `exception.…`)."""
    return {
        "id": event.event_id,
        "name": event.name,
        "user_id": event.user_id,
        "occurred_at": event.occurred_at.isoformat(),
        "received_at": event.received_at.isoformat(),
        "properties": event.properties,
    }


# --------------------------------------------------------------------------------------------
# Campaign membership, decisions and deterministic ids
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Membership:
    """A user's history with one campaign (all versions), kept by the application.

    Not part of `UserState`: the state is a pure projection of events (replay == live), while
    membership follows from decisions. `pending` holds the correlation values of pending
    instances (`""` for an uncorrelated campaign); `pending_instances` the same instances by
    correlation, with what re-arming (inactivity) and exceptions need.
    """

    last_entered_at: datetime | None = None
    last_sent_at: datetime | None = None
    pending: frozenset[str] = frozenset()
    pending_instances: Mapping[str, PendingInstance] = field(default_factory=dict)

    def pending_instance(self, correlation: str) -> PendingInstance | None:
        """The pending instance for `correlation`, when the application supplied it."""
        return self.pending_instances.get(correlation)


@dataclass(frozen=True, slots=True)
class PendingInstance:
    """A pending campaign instance as trigger and exception evaluation needs it.

    `trigger` is the event the instance was armed (or, for an inactivity instance, last
    re-armed) by; exception `match` expressions see it as `trigger`.
    """

    instance_id: uuid.UUID
    version: int
    correlation: str
    trigger: RecordedEvent
    due_at: datetime
    group: str | None = None
    """The experiment group assigned at entry (its delay re-arms an inactivity instance)."""


def is_reeligible(
    reeligibility: timedelta | None, last_sent_at: datetime | None, now: datetime
) -> bool:
    """Whether a user who last received the campaign at `last_sent_at` may receive it again.

    Re-eligibility counts from the last *send* (what the user received): an instance cancelled by
    an exception, or not sent at fire time, does not use up the user's eligibility. `None` means
    at most once per user, ever.
    """
    if last_sent_at is None:
        return True
    if reeligibility is None:
        return False
    return now - last_sent_at >= reeligibility


def correlation_value(value: Any) -> str | None:
    """The text of a correlation property value: strings as they are, integral numbers without a
    fraction (25.0 and 25 are the same cart), other values as canonical JSON; None when absent."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if value == int(value):
            return str(int(value))
        return repr(float(value))
    return canonical_json(value).decode("utf-8")


class DecisionKind(StrEnum):
    """What the rules service decided for one user, campaign and cause."""

    TRIGGERED = "triggered"
    FILTERED_OUT = "filtered_out"
    AUDIENCE_EXCLUDED = "audience_excluded"
    NOT_REELIGIBLE = "not_reeligible"
    ALREADY_PENDING = "already_pending"
    PAUSED = "paused"
    REARMED = "rearmed"
    CANCELLED = "cancelled"
    STILL_ACTIVE = "still_active"
    RESUMED = "resumed"
    SEND_PLANNED = "send_planned"
    HELD_OUT = "held_out"
    NO_MATCHING_MESSAGE = "no_matching_message"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Decision:
    """One explainable decision.

    `triggered`: `instance_id` and `due_at` are set (`delayed_until` too when the send waits).
    `rearmed` (inactivity): the pending `instance_id` moves to the new `due_at`. `cancelled`: the
    pending `instance_id` is cancelled by an exception event (`event_id`) or superseded by a new
    version. `still_active` (inactivity, at fire time): the instance stays pending. `resumed`:
    the pending `instance_id`'s timer is re-armed because its campaign was resumed.
    `send_planned` (at fire time): `branch` (index into `messages`) and `send_id`. `held_out`
    (at fire time, a user in a control group): what `send_planned` would have been, not sent.
    `error`: `error` holds the message and `detail` the failing expression's path and source.
    `detail` is what the decision record stores beyond kind and reason.
    """

    kind: DecisionKind
    workspace_id: str
    campaign_id: str
    version: int
    user_id: str
    event_id: str
    decided_at: datetime
    reason: str
    instance_id: uuid.UUID | None = None
    correlation: str = ""
    due_at: datetime | None = None
    delayed_until: datetime | None = None
    error: str | None = None
    branch: int | None = None
    send_id: uuid.UUID | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


# Same namespace and escaping as `nudge.ids.deterministic_id` (libs/nudge/ids.py), repeated here
# because domain code imports only the standard library; a unit test keeps the two equal.
ID_NAMESPACE: Final = uuid.UUID("6f1d8a8e-3c1b-5b7e-9a55-6e75646765a1")


def deterministic_id(kind: str, *parts: object) -> uuid.UUID:
    """uuid5 of `kind|part|part…` with `\\` and `|` escaped inside parts (no collisions)."""
    escaped = (str(p).replace("\\", "\\\\").replace("|", "\\|") for p in parts)
    return uuid.uuid5(ID_NAMESPACE, "|".join([kind, *escaped]))


def instance_id(
    workspace_id: str,
    campaign_id: str,
    version: int,
    user_id: str,
    correlation: str,
    occurrence: str = "",
) -> uuid.UUID:
    """The id of a campaign instance (and of its timer).

    `occurrence` tells successive entries of the same user and correlation apart (the trigger
    event id for an action trigger), so an entry after re-eligibility gets a new instance while a
    replayed decision gets the same one.
    """
    return deterministic_id(
        "instance", workspace_id, campaign_id, version, user_id, correlation, occurrence
    )


def send_id(
    workspace_id: str,
    campaign_id: str,
    version: int,
    user_id: str,
    trigger_event_id: str,
    channel: str,
) -> uuid.UUID:
    """The id of one send; dispatch records it so a redelivery never sends twice."""
    return deterministic_id(
        "send", workspace_id, campaign_id, version, user_id, trigger_event_id, channel
    )
