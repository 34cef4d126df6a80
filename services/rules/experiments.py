"""Experiments of a campaign: variants, control groups, conversion goals, and who gets what.

Pure: standard library only (durations and names use the rules domain's syntax), no I/O.

    experiment:
      control: 10                  # percent of entering users held out: nothing sent, measured
      variants:
        - {name: wait-1h,  weight: 50, delay: 1h}
        - {name: wait-24h, weight: 50, delay: 24h, message: {subject: "Still thinking?"}}
      salt: ""                     # optional; changing it resets the experiment
    conversion:
      event: purchase
      within: 3d                   # from the send (control: from when it would have been sent)
      match: "conversion.properties.cart_id == trigger.properties.cart_id"   # optional, CEL

Assignment is a function of (workspace, campaign, user, salt) only. Two independent draws,
each sha256 of its inputs mapped to a uniform number in [0, 1):

- the *hold-out draw* puts the user in `control` when it is below `control / 100`;
- the *split draw* picks the variant: variants own consecutive slices of [0, 1) in definition
  order, each as wide as its share of the total weight.

A workspace-wide global control group (`GlobalControl`) is checked before both with a draw of
(workspace, user, global salt) that does not involve the campaign, so the same users are held
out of every marketing campaign.

What is stable and what is not (tests/unit/rules/test_experiments.py shows each):

- Same inputs, same group: in every process, after restarts, in replay and backtest.
- A new campaign version keeps every assignment: the version is not an input, so editing the
  message, the trigger or the conversion goal moves nobody.
- Raising `control` only moves users from variants into control (those whose hold-out draw lies
  between the old and the new percentage); lowering it only moves users out. It never moves a
  user from one variant to another: the split draw is independent of the hold-out draw.
- Changing weights moves exactly the users whose split draw lies between an old and a new slice
  boundary. Changing the weight of one variant changes the total, so it can move users of
  *other* variants too (50/50 → 50/25/25 by adding a variant moves a quarter of everyone);
  reordering variants moves users; renaming one keeps its users (slices are positional).
- Changing `salt` (a reset) draws everything afresh: about `1 - Σ share²` of users change group.
- Changing the global control percentage or salt affects every campaign at once.

Changing the allocation in the middle of an experiment mixes periods with different
populations per arm; prefer a reset (new `salt`) and read the stats from the reset on.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from services.rules.domain import (
    EVENT_NAME,
    DurationError,
    format_duration,
    parse_duration,
)

CONTROL: Final = "control"
GLOBAL_CONTROL: Final = "global_control"
DEFAULT_VARIANT: Final = "treatment"
"""The group of every user who is not held out when no variants are defined."""
RESERVED_GROUPS: Final = frozenset({CONTROL, GLOBAL_CONTROL})

VARIANT_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_VARIANTS: Final = 10
MAX_SALT_CHARS: Final = 128
MAX_EXPRESSION_CHARS: Final = 4096
MAX_CONVERSION_WINDOW: Final = timedelta(days=90)
OVERRIDABLE_FIELDS: Final = ("to", "subject", "body", "html", "url", "payload")
MAX_TEMPLATE_CHARS: Final = 100_000

_EXPERIMENT_KEYS: Final = ("control", "variants", "salt")
_VARIANT_KEYS: Final = ("name", "weight", "delay", "message")
_CONVERSION_KEYS: Final = ("event", "within", "match")
_GLOBAL_CONTROL_KEYS: Final = ("percent", "salt")

_DRAW_SCHEME: Final = "nudge.experiment.v1"
_GLOBAL_DRAW_SCHEME: Final = "nudge.global-control.v1"


class ExperimentError(ValueError):
    """An `experiment:` or `conversion:` block is invalid; `path` names the field
    (`experiment.variants[1].weight`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


# --------------------------------------------------------------------------------------------
# The definitions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Variant:
    """One arm that receives the message: `weight` is relative to the other variants' weights;
    `delay` (None: the campaign's) and `message` (fields replacing the campaign message's, in
    every branch) are the variant's overrides."""

    name: str
    weight: float = 1.0
    delay: timedelta | None = None
    message: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "weight": _number(self.weight)}
        if self.delay is not None:
            out["delay"] = format_duration(self.delay)
        if self.message is not None:
            out["message"] = dict(self.message)
        return out


@dataclass(frozen=True, slots=True)
class Experiment:
    """Control percentage, variants (at least one) and the assignment salt.

    Without `variants:` in the YAML there is one implicit variant, `treatment`, that gets the
    campaign as written (a pure hold-out test).
    """

    control_percent: float
    variants: tuple[Variant, ...]
    salt: str = ""

    @property
    def groups(self) -> tuple[str, ...]:
        """Every group a user of this campaign can be in (`control` first when it exists)."""
        names = tuple(variant.name for variant in self.variants)
        return (CONTROL, *names) if self.control_percent > 0 else names

    def variant(self, name: str) -> Variant | None:
        """The variant called `name`; None for `control` and unknown names."""
        for variant in self.variants:
            if variant.name == name:
                return variant
        return None

    def shares(self) -> dict[str, float]:
        """The expected fraction of entering users per group (excluding global control)."""
        control = self.control_percent / 100.0
        total = sum(variant.weight for variant in self.variants)
        out = {CONTROL: control} if control > 0 else {}
        for variant in self.variants:
            out[variant.name] = (1.0 - control) * variant.weight / total
        return out

    def to_dict(self) -> dict[str, Any]:
        """The canonical form: `parse_experiment(e.to_dict()) == e`."""
        out: dict[str, Any] = {
            "control": _number(self.control_percent),
            "variants": [variant.to_dict() for variant in self.variants],
        }
        if self.salt:
            out["salt"] = self.salt
        return out


@dataclass(frozen=True, slots=True)
class Conversion:
    """The goal: the first `event` within `within` of the send (or of when the send would have
    happened, for a held-out user), for which the CEL `match` (variables `conversion`,
    `trigger`, `user`) is true when given."""

    event: str
    within: timedelta
    match: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.event, "within": format_duration(self.within)}
        if self.match is not None:
            out["match"] = self.match
        return out


@dataclass(frozen=True, slots=True)
class GlobalControl:
    """The workspace-wide hold-out: `percent` of users receive no marketing campaign."""

    percent: float
    salt: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"percent": _number(self.percent)}
        if self.salt:
            out["salt"] = self.salt
        return out


@dataclass(frozen=True, slots=True)
class ExperimentBlocks:
    """The `experiment:` and `conversion:` blocks of one campaign document (each optional)."""

    experiment: Experiment | None
    conversion: Conversion | None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.experiment is not None:
            out["experiment"] = self.experiment.to_dict()
        if self.conversion is not None:
            out["conversion"] = self.conversion.to_dict()
        return out


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def parse_blocks(campaign: Mapping[str, Any]) -> ExperimentBlocks:
    """Parse the `experiment:` and `conversion:` keys of a campaign document (as from
    `yaml.safe_load`); other keys are ignored (the campaign parser owns them)."""
    if not isinstance(campaign, Mapping):
        raise ExperimentError("", "a campaign must be a mapping")
    experiment = campaign.get("experiment")
    conversion = campaign.get("conversion")
    return ExperimentBlocks(
        experiment=None if experiment is None else parse_experiment(experiment),
        conversion=None if conversion is None else parse_conversion(conversion),
    )


def parse_experiment(value: Any, path: str = "experiment") -> Experiment:
    """Validate an `experiment:` block; raises `ExperimentError(path, message)`."""
    doc = _mapping(value, path)
    _check_keys(doc, _EXPERIMENT_KEYS, path)
    control = _percent(doc.get("control", 0), _join(path, "control"))
    if control >= 100:
        raise ExperimentError(_join(path, "control"), "must be below 100 (someone must get it)")
    salt = _optional_string(doc, "salt", path, MAX_SALT_CHARS) or ""
    variants = _parse_variants(doc.get("variants"), _join(path, "variants"))
    if not variants:
        variants = (Variant(DEFAULT_VARIANT),)
    if control == 0 and len(variants) < 2:
        raise ExperimentError(path, "needs a control percentage above 0 or at least two variants")
    return Experiment(control_percent=control, variants=variants, salt=salt)


def _parse_variants(value: Any, path: str) -> tuple[Variant, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ExperimentError(path, "must be a list")
    if not value:
        raise ExperimentError(path, "must not be empty (leave it out for a pure hold-out test)")
    if len(value) > MAX_VARIANTS:
        raise ExperimentError(path, f"has more than {MAX_VARIANTS} variants")
    docs = [_mapping(item, f"{path}[{index}]") for index, item in enumerate(value)]
    weighted = [index for index, doc in enumerate(docs) if doc.get("weight") is not None]
    if weighted and len(weighted) != len(docs):
        missing = next(index for index in range(len(docs)) if index not in weighted)
        raise ExperimentError(
            f"{path}[{missing}].weight", "give a weight to every variant or to none (equal split)"
        )
    variants: list[Variant] = []
    seen: set[str] = set()
    for index, doc in enumerate(docs):
        here = f"{path}[{index}]"
        _check_keys(doc, _VARIANT_KEYS, here)
        name = _optional_string(doc, "name", here, 63)
        if name is None:
            raise ExperimentError(_join(here, "name"), "is required")
        if not VARIANT_NAME.match(name):
            raise ExperimentError(_join(here, "name"), "must match ^[a-z0-9][a-z0-9_-]{0,62}$")
        if name in RESERVED_GROUPS:
            raise ExperimentError(_join(here, "name"), f"{name!r} is reserved")
        if name in seen:
            raise ExperimentError(_join(here, "name"), f"{name!r} is used twice")
        seen.add(name)
        weight = 1.0
        if weighted:
            weight = _positive_number(doc["weight"], _join(here, "weight"))
        delay = _optional_duration(doc, "delay", here)
        message = _message_override(doc.get("message"), _join(here, "message"))
        variants.append(Variant(name=name, weight=weight, delay=delay, message=message))
    return tuple(variants)


def _message_override(value: Any, path: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    doc = _mapping(value, path)
    if "channel" in doc:
        raise ExperimentError(
            _join(path, "channel"), "a variant cannot change the channel (consent and caps differ)"
        )
    _check_keys(doc, OVERRIDABLE_FIELDS, path)
    if not doc:
        raise ExperimentError(path, "must override at least one field")
    out: dict[str, Any] = {}
    for key, item in doc.items():
        here = _join(path, key)
        if key == "payload":
            if not isinstance(item, Mapping):
                raise ExperimentError(here, "must be a mapping")
            out[key] = _json_copy(item, here, 0)
            continue
        text = _optional_string(doc, key, path, MAX_TEMPLATE_CHARS)
        if text is None:
            raise ExperimentError(here, "must not be null")
        out[key] = text
    return out


def parse_conversion(value: Any, path: str = "conversion") -> Conversion:
    """Validate a `conversion:` block; raises `ExperimentError(path, message)`.

    `match` is kept as CEL source; compiling it (variables `conversion`, `trigger`, `user`) is
    the rules service's job when the campaign is applied.
    """
    doc = _mapping(value, path)
    _check_keys(doc, _CONVERSION_KEYS, path)
    event = _optional_string(doc, "event", path, 129)
    if event is None:
        raise ExperimentError(_join(path, "event"), "is required")
    if not EVENT_NAME.match(event):
        raise ExperimentError(_join(path, "event"), "is not a valid event name")
    within = _optional_duration(doc, "within", path)
    if within is None:
        raise ExperimentError(_join(path, "within"), "is required")
    if within <= timedelta(0):
        raise ExperimentError(_join(path, "within"), "must be longer than 0s")
    if within > MAX_CONVERSION_WINDOW:
        raise ExperimentError(
            _join(path, "within"), f"must be at most {format_duration(MAX_CONVERSION_WINDOW)}"
        )
    match = _optional_string(doc, "match", path, MAX_EXPRESSION_CHARS)
    return Conversion(event=event, within=within, match=match)


def parse_global_control(value: Any, path: str = "global_control") -> GlobalControl:
    """Validate the workspace policy's `global_control: {percent, salt}` block."""
    doc = _mapping(value, path)
    _check_keys(doc, _GLOBAL_CONTROL_KEYS, path)
    if "percent" not in doc:
        raise ExperimentError(_join(path, "percent"), "is required")
    percent = _percent(doc["percent"], _join(path, "percent"))
    if percent > 50:
        raise ExperimentError(_join(path, "percent"), "must be at most 50")
    salt = _optional_string(doc, "salt", path, MAX_SALT_CHARS) or ""
    return GlobalControl(percent=percent, salt=salt)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ExperimentError(path, "must be a mapping")
    return value


def _check_keys(doc: Mapping[Any, Any], allowed: Iterable[str], path: str) -> None:
    allowed_set = frozenset(allowed)
    for key in doc:
        if not isinstance(key, str):
            raise ExperimentError(path, f"keys must be strings, got {key!r}")
        if key not in allowed_set:
            expected = ", ".join(sorted(allowed_set))
            raise ExperimentError(_join(path, key), f"unknown field (expected one of: {expected})")


def _optional_string(doc: Mapping[str, Any], key: str, path: str, max_chars: int) -> str | None:
    here = _join(path, key)
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ExperimentError(here, f"must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise ExperimentError(here, "must not be empty")
    if len(value) > max_chars:
        raise ExperimentError(here, f"is longer than {max_chars} characters")
    return value


def _optional_duration(doc: Mapping[str, Any], key: str, path: str) -> timedelta | None:
    if doc.get(key) is None:
        return None
    try:
        return parse_duration(doc[key])
    except DurationError as error:
        raise ExperimentError(_join(path, key), error.message) from None


def _finite_number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ExperimentError(path, f"must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ExperimentError(path, "must be a finite number")
    return number


def _percent(value: Any, path: str) -> float:
    number = _finite_number(value, path)
    if not 0 <= number <= 100:
        raise ExperimentError(path, "must be a percentage between 0 and 100")
    return number


def _positive_number(value: Any, path: str) -> float:
    number = _finite_number(value, path)
    if number <= 0:
        raise ExperimentError(path, "must be greater than 0")
    if number > 1_000_000:
        raise ExperimentError(path, "must be at most 1000000")
    return number


def _number(value: float) -> int | float:
    """Integral values as int, so YAML `10` and `10.0` have one canonical form."""
    return int(value) if value == int(value) else value


def _json_copy(value: Any, path: str, depth: int) -> Any:
    if depth > 16:
        raise ExperimentError(path, "is nested too deeply")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ExperimentError(path, "must be a finite number")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ExperimentError(path, f"keys must be strings, got {key!r}")
            out[key] = _json_copy(item, f"{path}.{key}", depth + 1)
        return out
    if isinstance(value, list):
        return [_json_copy(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise ExperimentError(path, f"is not a JSON value ({type(value).__name__})")


# --------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------


def draw(*parts: str) -> float:
    """A uniform number in [0, 1) from sha256 of the `|`-joined parts (`\\` and `|` escaped, so
    different part lists never collide): the top 53 bits of the digest, exactly representable."""
    escaped = "|".join(part.replace("\\", "\\\\").replace("|", "\\|") for part in parts)
    digest = hashlib.sha256(escaped.encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


@dataclass(frozen=True, slots=True)
class Assignment:
    """The group of one user in one campaign: `control`, `global_control`, or a variant name.

    `bucket` is the draw that decided it: the global or campaign hold-out draw for the control
    groups (held out because it is below `percent`), the split draw for a variant.
    """

    group: str
    bucket: float
    percent: float | None = None

    @property
    def held_out(self) -> bool:
        """True when nothing is sent to the user (measured only)."""
        return self.group in RESERVED_GROUPS

    @property
    def reason(self) -> str:
        """How the group was decided, for `nudge why`."""
        if self.percent is not None:
            label = "global control" if self.group == GLOBAL_CONTROL else "control"
            return f"{label}: draw {self.bucket:.4f} < {_percent_text(self.percent)}"
        if self.group == DEFAULT_VARIANT:
            return f"{DEFAULT_VARIANT}: not held out"
        return f"variant {self.group}: split draw {self.bucket:.4f}"


def applicable_global_control(kind: str, control: GlobalControl | None) -> GlobalControl | None:
    """The workspace's global control as it applies to a campaign of `kind`: marketing only
    (nobody is held out of a transactional message)."""
    return control if kind == "marketing" else None


def in_global_control(workspace_id: str, user_id: str, control: GlobalControl | None) -> bool:
    """Whether the user is in the workspace's global control group (any campaign)."""
    return _global_draw(workspace_id, user_id, control) is not None


def _global_draw(workspace_id: str, user_id: str, control: GlobalControl | None) -> float | None:
    if control is None or control.percent <= 0:
        return None
    value = draw(_GLOBAL_DRAW_SCHEME, workspace_id, user_id, control.salt)
    return value if value < control.percent / 100.0 else None


def assign(
    workspace_id: str,
    campaign_id: str,
    user_id: str,
    experiment: Experiment | None,
    reset_salt: str | None = None,
    *,
    global_control: GlobalControl | None = None,
) -> Assignment:
    """The user's group in the campaign: global control first, then the campaign's control,
    then a variant by cumulative weight.

    `reset_salt` overrides the experiment's `salt` (None: use it). `global_control` is the
    workspace's; pass None for transactional campaigns, which nobody is held out of. Without
    an experiment every user not in global control is in `treatment`.
    """
    held = _global_draw(workspace_id, user_id, global_control)
    if held is not None:
        assert global_control is not None
        return Assignment(GLOBAL_CONTROL, held, global_control.percent)
    salt = (experiment.salt if experiment is not None else "") if reset_salt is None else reset_salt
    split = draw(_DRAW_SCHEME, "split", workspace_id, campaign_id, user_id, salt)
    if experiment is None:
        return Assignment(DEFAULT_VARIANT, split)
    if experiment.control_percent > 0:
        holdout = draw(_DRAW_SCHEME, "holdout", workspace_id, campaign_id, user_id, salt)
        if holdout < experiment.control_percent / 100.0:
            return Assignment(CONTROL, holdout, experiment.control_percent)
    return Assignment(pick_variant(experiment.variants, split).name, split)


def pick_variant(variants: Sequence[Variant], split: float) -> Variant:
    """The variant whose slice of [0, 1) holds `split` (slices in order, width ∝ weight)."""
    if not variants:
        raise ValueError("no variants")
    total = math.fsum(variant.weight for variant in variants)
    cumulative = 0.0
    for variant in variants[:-1]:
        cumulative += variant.weight
        if split < cumulative / total:
            return variant
    return variants[-1]  # the last slice ends at 1.0 exactly, whatever the rounding above


def _percent_text(percent: float) -> str:
    return f"{_number(percent)}%"
