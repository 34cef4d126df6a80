"""CEL for campaign expressions: a small, typed wrapper around cel-expr-python.

What cel-expr-python 0.1.3 does (probed on this machine; the unit tests pin the parts we rely on):

Compiling
- `cel.NewEnv(variables={"user": cel.Type.DYN})` then `env.compile(src)` parses AND type-checks.
  Failures raise a plain `RuntimeError("INVALID_ARGUMENT: ERROR: <input>:1:4: ... | src | ...^
  [INVALID_ARGUMENT]")`: syntax errors, undeclared variables (`foo.x`), unknown functions, and
  overloads that do not exist for the *static* types. We map them to `CelCompileError` (message
  without the status prefix, caret snippet kept). Parser nesting is limited to depth 32.
- Static typing means literal mixes are compile errors: `20 > 10.5`, `20 == 20.0`,
  `double(x) > 20` are rejected ("no matching overload for '_>_' applied to '(int, double)'").
  Write `20.0 > 10.5`. Comparisons involving a DYN variable are checked at run time instead (next).
- `expr.return_type()` is the static result type (`BOOL`, `INT`, `DYN`...); campaigns reject
  predicates whose static type is neither BOOL nor DYN at apply time.
- Compiling costs ~70 µs, so compiled expressions are cached (LRU by source and variables).

Values in
- Accepted: None, bool, int (int64; 2**63..2**64-1 become uint, larger ints are an evaluation
  error), float, str, bytes, and *exact* `dict` / `list` nested freely. Map keys must be str, int or
  bool (a float or None key is an error).
- Refused, lazily, as an evaluation error "Non-CEL value type": tuples, dict subclasses,
  MappingProxyType, datetime, timedelta (datetime only works for a variable declared TIMESTAMP,
  never inside a DYN map). So views hold timestamps as ISO 8601 strings and expressions convert
  with `timestamp(user.last_seen)` (both `Z` and `+00:00` offsets parse).
- A str with a lone surrogate makes `eval` raise `RuntimeError` instead of returning an error.
- Conversion cost: every map an expression indexes is converted IN FULL on first access, per
  activation. `user.events['purchase'].count` over a user with 200 event names costs ~500 µs, with
  5 names ~30 µs, with 1 name ~15 µs. Hence views hold only the event names expressions reference
  (`referenced_event_names`), and one `Activation` per event is shared by every campaign's
  expressions: an activation caches what it converted (it also snapshots the data: later
  mutation of the dicts is not seen). An activation built from any env works with an expression
  compiled in another env, so we build them from one variable-less env.
- `expr.eval(data=...)` converts again on every call and, with large maps, is many times slower
  than `eval(activation=...)`; we always go through an `Activation`.

Numbers (int vs double)
- At run time, comparisons and equality across int/uint/double are heterogeneous and exact:
  `event.properties.total > 20` is true for 25 and 25.0 and false for 20 and 20.0;
  `total == 20` is true for 20.0. So the issue-2 filter works whatever the JSON number's type.
- Arithmetic is NOT mixed: `total + 1` with total 20.0 is an evaluation error ("No matching
  overloads found : _+_(double, int64)"), and `x + 1.0` with x int is too. To make the type of a
  JSON number independent of how it reached us (protobuf Struct gives float; JSON text "25" gives
  int), event properties and traits are passed as CEL double (`json_numbers_as_double`), which is
  also CEL's own mapping of JSON numbers. Write `event.properties.total * 2.0`,
  `int(event.properties.qty) + 1`. Counts in the user view are int; sums are double.

Null, missing keys, has()
- JSON null is CEL `null`: `x == null` works; `null > 20` is an evaluation error.
- A missing map key (`event.properties.missing`, `user.events['never_seen']`) is an evaluation
  error ("NOT_FOUND: Key not found in map"), not false. `has(event.properties.missing)` is false;
  `'missing' in event.properties` is false. `has(a.b.c)` when `a.b` itself is missing is an error.
  We keep this strictness (a typo in a property name should surface, not silently filter
  everyone out): the error becomes an `error` decision with the message. Guard optional
  properties with `has(...)`. `user.events[NAME]` never fails for a referenced literal NAME
  because the view holds zero entries for them.
- `&&` / `||` absorb errors like the CEL spec says (commutative): `false && <error>` is false,
  `<error> || true` is true.

Results out
- `eval` never raises for run-time failures: it returns a `Value` whose `type()` is ERROR and
  whose `value()` is the message. `value()` of a BOOL is a Python bool; `plain_value()` turns maps
  and lists into plain Python values. Evaluating a small predicate over a shared activation costs
  ~3 µs; building the activation and the first access of the user view ~10-20 µs.
- `.?` optional syntax and string extensions (`lowerAscii`) are not enabled in this build.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from typing import Any, Final

from cel_expr_python import cel as _cel

from services.rules.domain import (
    ActionTrigger,
    CampaignDefinition,
    CampaignError,
    MessageBranch,
    ThresholdTrigger,
    override_messages,
)

MAX_SOURCE_CHARS: Final = 4096
COMPILE_CACHE_SIZE: Final = 2048
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class CelError(Exception):
    """Base of CEL failures; `source` is the expression, `message` what went wrong."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(message)
        self.source = source
        self.message = message


class CelCompileError(CelError):
    """The expression does not parse or type-check."""


class CelEvaluationError(CelError):
    """Evaluation failed (missing key, no overload for the values, non-bool predicate...)."""


_STATUS_PREFIX = re.compile(r"^[A-Z_]+: (?:ERROR: <input>:)?")
_STATUS_SUFFIX = re.compile(r"\s*\[[A-Z_]+\]\s*$")


def _clean(text: str) -> str:
    return _STATUS_SUFFIX.sub("", _STATUS_PREFIX.sub("", text, count=1))


_BASE_ENV: Final = _cel.NewEnv()
_ERROR: Final = _cel.Type.ERROR
_UNKNOWN: Final = _cel.Type.UNKNOWN
_PREDICATE_TYPES: Final = ("bool", "dyn")


class Activation:
    """CEL variables, converted lazily and cached: build one per event, share it across
    expressions."""

    __slots__ = ("_native",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._native = _BASE_ENV.Activation(data=dict(data))


def activation(data: Mapping[str, Any]) -> Activation:
    """An activation for `data` (plain dict/list/str/int/float/bool/None values only)."""
    return Activation(data)


class CompiledExpression:
    """A compiled CEL expression; evaluate it many times."""

    __slots__ = ("_expr", "references", "return_type", "source", "variables")

    def __init__(self, source: str, variables: tuple[str, ...], expr: Any) -> None:
        self.source = source
        self.variables = variables
        self._expr = expr
        self.return_type: str = expr.return_type().name().lower()
        # The declared variables the source mentions (a superset: a mention inside a string
        # literal counts), so callers can skip building the views an expression never reads.
        self.references: frozenset[str] = frozenset(
            name for name in variables if re.search(rf"(?<![\w.$]){name}\b", source)
        )

    def __repr__(self) -> str:
        return f"CompiledExpression({self.source!r}, variables={self.variables!r})"

    def _eval(self, data: Mapping[str, Any] | Activation) -> Any:
        native = data._native if isinstance(data, Activation) else Activation(data)._native
        try:
            return self._expr.eval(activation=native)
        except (RuntimeError, ValueError, TypeError) as error:
            raise CelEvaluationError(self.source, _clean(str(error))) from None

    def evaluate(self, data: Mapping[str, Any] | Activation) -> Any:
        """The result as a plain Python value; `CelEvaluationError` when evaluation fails."""
        value = self._eval(data)
        kind = value.type()
        if kind in (_ERROR, _UNKNOWN):
            raise CelEvaluationError(self.source, _clean(str(value.value())))
        return value.plain_value()

    def evaluate_bool(self, data: Mapping[str, Any] | Activation) -> bool:
        """The result of a predicate; a non-bool result is a `CelEvaluationError`."""
        value = self._eval(data)
        result = value.value()
        if result is True or result is False:
            return result
        kind = value.type()
        if kind in (_ERROR, _UNKNOWN):
            raise CelEvaluationError(self.source, _clean(str(result)))
        raise CelEvaluationError(
            self.source, f"expected a bool result, got {kind.name().lower()} {result!r}"
        )


@lru_cache(maxsize=64)
def _env(variables: tuple[str, ...]) -> Any:
    return _cel.NewEnv(variables=dict.fromkeys(variables, _cel.Type.DYN))


@lru_cache(maxsize=COMPILE_CACHE_SIZE)
def _compile(source: str, variables: tuple[str, ...]) -> CompiledExpression:
    if len(source) > MAX_SOURCE_CHARS:
        raise CelCompileError(source, f"is longer than {MAX_SOURCE_CHARS} characters")
    try:
        expr = _env(variables).compile(source)
    except (RuntimeError, ValueError, TypeError) as error:
        raise CelCompileError(source, _clean(str(error))) from None
    return CompiledExpression(source, variables, expr)


def compile_expression(source: str, variables: Iterable[str]) -> CompiledExpression:
    """Compile `source` with the given DYN-typed variables (cached by source and variables)."""
    names = tuple(sorted(set(variables)))
    for name in names:
        if not _IDENTIFIER.match(name):
            raise ValueError(f"not a CEL variable name: {name!r}")
    return _compile(source, names)


def json_numbers_as_double(value: Any) -> Any:
    """`value` with every int (not bool) turned into a float, tuples into lists, mappings into
    dicts: CEL's mapping of JSON. Returns the same object when nothing changes."""
    kind = type(value)
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if kind is dict:
        changed: dict[Any, Any] | None = None
        for key, item in value.items():
            new = json_numbers_as_double(item)
            if new is not item:
                if changed is None:
                    changed = dict(value)
                changed[key] = new
        return value if changed is None else changed
    if kind is list:
        items: list[Any] | None = None
        for index, item in enumerate(value):
            new = json_numbers_as_double(item)
            if new is not item:
                if items is None:
                    items = list(value)
                items[index] = new
        return value if items is None else items
    if isinstance(value, Mapping):
        return {key: json_numbers_as_double(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [json_numbers_as_double(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------
# What expressions and templates reference (to keep the user view small)
# --------------------------------------------------------------------------------------------

_USER_REF = re.compile(r"(?<![\w.$])user\b")
_FIELD = re.compile(r"\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")
_LITERAL_INDEX = re.compile(r"""\s*\[\s*(?:'([^'\\\n]*)'|"([^"\\\n]*)")\s*\]""")
_CALL = re.compile(r"\s*\(")
_SUM_REF = re.compile(
    r"""\.\s*sum\s*(?:\[\s*(?:'([^'\\\n]*)'|"([^"\\\n]*)")\s*\]|\.\s*([A-Za-z_][A-Za-z0-9_]*))"""
)
_LIQUID_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)


def referenced_event_names(texts: Iterable[str]) -> frozenset[str] | None:
    """Event names used as `user.events['NAME']` / `user.events.NAME` in the texts.

    None when some use needs the whole map (`user.events.exists(...)`, `user.events[x]`, `user`
    on its own or indexed, the word `user` inside a string): the view must then hold every name.
    """
    names: set[str] = set()
    for text in texts:
        for match in _USER_REF.finditer(text):
            field = _FIELD.match(text, match.end())
            if field is None:
                return None
            if field.group(1) != "events":
                continue
            index = _LITERAL_INDEX.match(text, field.end())
            if index is not None:
                names.add(index.group(1) if index.group(1) is not None else index.group(2))
                continue
            name = _FIELD.match(text, field.end())
            if name is None or _CALL.match(text, name.end()):
                return None
            names.add(name.group(1))
    return frozenset(names)


def referenced_sum_properties(texts: Iterable[str]) -> frozenset[str]:
    """Property names used as `.sum['NAME']` / `.sum.NAME` (zero-filled in the view)."""
    found: set[str] = set()
    for text in texts:
        for match in _SUM_REF.finditer(text):
            found.add(next(group for group in match.groups() if group is not None))
    return frozenset(found)


def template_expressions(template: str) -> list[str]:
    """The `{{ ... }}` and `{% ... %}` parts of a Liquid template (where variables live)."""
    return _LIQUID_TAG.findall(template)


# --------------------------------------------------------------------------------------------
# Campaigns
# --------------------------------------------------------------------------------------------

WHERE_VARIABLES: Final = ("event", "user")
AUDIENCE_VARIABLES: Final = ("user",)
THRESHOLD_VARIABLES: Final = ("user",)
EXCEPTION_VARIABLES: Final = ("exception", "trigger", "user")
WHEN_VARIABLES: Final = ("user", "event", "trigger")
CONVERSION_VARIABLES: Final = ("conversion", "trigger", "user")


@dataclass(frozen=True, slots=True)
class CompiledCampaign:
    """A campaign version with every CEL expression compiled (once per version).

    `exception_matches[i]` / `branch_conditions[i]` line up with `definition.exceptions[i]` /
    `definition.messages[i]` (None where no expression is given). `referenced_event_names` is
    what the user view must hold for its expressions and templates (None: every name);
    `sum_properties` the `sum[...]` names to zero-fill. `trigger_event_names` are the event
    names whose projection can start an instance: the trigger's event, or for a threshold the
    names that can change its condition (None: any event can).
    """

    definition: CampaignDefinition
    version: int
    where: CompiledExpression | None
    audience: CompiledExpression | None
    threshold: CompiledExpression | None
    exception_matches: tuple[CompiledExpression | None, ...]
    branch_conditions: tuple[CompiledExpression | None, ...]
    referenced_event_names: frozenset[str] | None
    sum_properties: frozenset[str]
    trigger_event_names: frozenset[str] | None = None
    conversion_match: CompiledExpression | None = None
    group_delays: Mapping[str, timedelta] = field(default_factory=dict)
    group_messages: Mapping[str, tuple[MessageBranch, ...]] = field(default_factory=dict)
    horizon: timedelta | None = None
    """How long after entry a conversion counts for the stats (None: no `conversion:`)."""

    def delay_for(self, group: str | None) -> timedelta:
        """The delay of an experiment group (the campaign's own for control groups, unknown
        groups and None)."""
        return self.group_delays.get(group or "", self.definition.delay)

    def messages_for(self, group: str | None) -> tuple[MessageBranch, ...]:
        """The message branches of an experiment group (with the variant's overrides)."""
        return self.group_messages.get(group or "", self.definition.messages)


def _predicate(
    source: str | None, variables: tuple[str, ...], path: str
) -> CompiledExpression | None:
    if source is None:
        return None
    try:
        compiled = compile_expression(source, variables)
    except CelCompileError as error:
        raise CampaignError(path, f"invalid CEL: {error.message}") from None
    if compiled.return_type not in _PREDICATE_TYPES:
        raise CampaignError(path, f"must be a boolean expression, not {compiled.return_type}")
    return compiled


_USER_FIELD = re.compile(r"(?<![\w.$])user\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")
_CONSTANT_USER_FIELDS: Final = frozenset({"id"})
_TRAIT_FIELDS: Final = frozenset({"traits", "timezone"})


def condition_event_names(condition: str) -> frozenset[str] | None:
    """Event names whose projection can change the value of a condition on `user`.

    `user.events['x']…` changes only with `x`; `user.traits` and `user.timezone` only with
    `$identify`; `user.id` never. Anything else (`user.lifecycle`, `user.last_seen`, a
    computed index) can change with any event: None.
    """
    if len(_USER_REF.findall(condition)) != len(_USER_FIELD.findall(condition)):
        return None  # `user` on its own or indexed: it may read any field
    names: set[str] = set()
    for match in _USER_FIELD.finditer(condition):
        name = match.group(1)
        if name == "events":
            continue
        if name in _TRAIT_FIELDS:
            names.add("$identify")
        elif name not in _CONSTANT_USER_FIELDS:
            return None
    events = referenced_event_names([condition])
    if events is None:
        return None
    return frozenset(names | events)


def compile_campaign(definition: CampaignDefinition, version: int = 0) -> CompiledCampaign:
    """Compile every expression of `definition`; a compile error is a `CampaignError` whose path
    names the expression (`trigger.where`, `exceptions[0].match`, `messages[1].when`).

    `version` is the stored version number (used for instance and send ids); 0 when compiling
    only to validate.
    """
    trigger = definition.trigger
    where = None
    threshold = None
    if isinstance(trigger, ActionTrigger):
        where = _predicate(trigger.where, WHERE_VARIABLES, "trigger.where")
    elif isinstance(trigger, ThresholdTrigger):
        threshold = _predicate(trigger.condition, THRESHOLD_VARIABLES, "trigger.threshold")
    audience = _predicate(definition.audience, AUDIENCE_VARIABLES, "audience")
    matches = tuple(
        _predicate(rule.match, EXCEPTION_VARIABLES, f"exceptions[{index}].match")
        for index, rule in enumerate(definition.exceptions)
    )
    conditions = tuple(
        _predicate(branch.when, WHEN_VARIABLES, f"messages[{index}].when")
        for index, branch in enumerate(definition.messages)
    )
    conversion = definition.conversion
    conversion_match = _predicate(
        None if conversion is None else conversion.match, CONVERSION_VARIABLES, "conversion.match"
    )
    group_delays: dict[str, timedelta] = {}
    group_messages: dict[str, tuple[MessageBranch, ...]] = {}
    if definition.experiment is not None:
        for index, variant in enumerate(definition.experiment.variants):
            group_delays[variant.name] = (
                definition.delay if variant.delay is None else variant.delay
            )
            group_messages[variant.name] = override_messages(
                definition.messages,
                variant.message or {},
                f"experiment.variants[{index}].message",
            )
    texts = [source for _, source in definition.expressions()]
    for branches in (definition.messages, *group_messages.values()):
        for branch in branches:
            for template in branch.message.templates():
                texts.extend(template_expressions(template))
    return CompiledCampaign(
        definition=definition,
        version=version,
        where=where,
        audience=audience,
        threshold=threshold,
        exception_matches=matches,
        branch_conditions=conditions,
        referenced_event_names=referenced_event_names(texts),
        sum_properties=referenced_sum_properties(texts),
        trigger_event_names=(
            condition_event_names(trigger.condition)
            if isinstance(trigger, ThresholdTrigger)
            else frozenset({trigger.event})
        ),
        conversion_match=conversion_match,
        group_delays=group_delays,
        group_messages=group_messages,
        horizon=definition.analysis_horizon(),
    )
