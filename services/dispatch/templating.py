"""Liquid rendering of message definitions: sandboxed, strict, cached.

Workspace admins author templates; end-user data only ever reaches a template as a variable
of the render context, never as template source.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from typing import Any, ClassVar, Final

from liquid import BoundTemplate, Environment, FalsyStrictUndefined, RenderContext
from liquid.exceptions import (
    LiquidError,
    LiquidSyntaxError,
    ResourceLimitError,
    UndefinedError,
    UnknownFilterError,
)

MAX_TEMPLATE_SOURCE_CHARS: Final = 256 * 1024
OUTPUT_LIMIT_CHARS: Final = 256 * 1024
LOOP_ITERATION_LIMIT: Final = 10_000
LOCAL_NAMESPACE_LIMIT_BYTES: Final = 256 * 1024
CONTEXT_DEPTH_LIMIT: Final = 10
RENDER_DEADLINE_S: Final = 1.0
COMPILED_TEMPLATE_CACHE_SIZE: Final = 512

UNSUBSCRIBE_VARIABLE: Final = "unsubscribe_url"
"""The message's one-click unsubscribe link (marketing email; an empty string elsewhere), for
the visible link a marketing email must carry."""
CONTEXT_ROOTS: Final = frozenset({"user", "event", "trigger", "campaign", UNSUBSCRIBE_VARIABLE})
HTML_FIELDS: Final = frozenset({"html"})
JSON_FIELDS: frozenset[str] = frozenset({"payload"})
HEADER_FIELDS: Final = frozenset({"to", "subject", "from"})

# Partials need a loader and we have none: reject them when a campaign is applied rather
# than failing every send with "template not found".
_DISABLED_TAGS: Final = ("include", "render")

_LINE_BREAKS_AND_CONTROLS: Final = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")


class RenderError(Exception):
    """A message field could not be rendered; rendering is deterministic, so never retryable."""

    retryable: ClassVar[bool] = False

    def __init__(self, field: str, reason: str, *, kind: str = "error") -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.kind = kind


class _MissingVariable(FalsyStrictUndefined):
    """Printing or iterating a missing variable fails; `if`, `unless` and `default` work."""

    force_liquid_default = True


class RenderDeadlineError(ResourceLimitError):
    """The cooperative wall-clock budget of one render ran out."""


class FilterOperandLimitError(ResourceLimitError):
    """A filter was given, or produced, a value beyond the sandbox's size limits."""


_render_deadline: ContextVar[float | None] = ContextVar("nudge_render_deadline", default=None)


def _check_deadline() -> None:
    deadline = _render_deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise RenderDeadlineError("render deadline exceeded", token=None)


def _check_operand_size(filter_name: str, value: object) -> None:
    if isinstance(value, str):
        if len(value) > OUTPUT_LIMIT_CHARS:
            raise FilterOperandLimitError(f"string too large in filter '{filter_name}'", token=None)
    elif isinstance(value, (list, tuple, range, dict)) and len(value) > LOOP_ITERATION_LIMIT:
        raise FilterOperandLimitError(f"collection too large in filter '{filter_name}'", token=None)


def _check_replace_growth(value: object, args: tuple[object, ...]) -> None:
    scalar = (str, int, float)
    if len(args) < 2 or not all(isinstance(item, scalar) for item in (value, *args[:2])):
        return
    text, old, new = str(value), str(args[0]), str(args[1])
    occurrences = text.count(old) if old else len(text) + 1
    if len(text) + occurrences * (len(new) - len(old)) > OUTPUT_LIMIT_CHARS:
        raise FilterOperandLimitError("result too large in filter 'replace'", token=None)


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    # The built-in limits bound loops, assigns and output, but not work done inside one
    # filter call: `{{ (1..100000000) | join }}` ran for 30+ s before the output limit.
    @functools.wraps(func)
    def guarded(value: object, *args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        _check_operand_size(name, value)
        for argument in args:
            _check_operand_size(name, argument)
        if name == "replace":
            _check_replace_growth(value, args)
        result = func(value, *args, **kwargs)
        _check_operand_size(name, result)
        return result

    return guarded


def _json_filter(value: object) -> str:
    # `default=str` also makes a missing variable raise its UndefinedError here.
    return json.dumps(value, ensure_ascii=False, default=str)


class _SandboxContext(RenderContext):
    def raise_for_loop_limit(self, length: int = 1) -> None:
        _check_deadline()
        super().raise_for_loop_limit(length)


class _SandboxTemplate(BoundTemplate):
    context_class = _SandboxContext


class SandboxedEnvironment(Environment):
    """Strict Liquid with resource limits, no partials, and size-guarded filters."""

    loop_iteration_limit: ClassVar[int | None] = LOOP_ITERATION_LIMIT
    output_stream_limit: ClassVar[int | None] = OUTPUT_LIMIT_CHARS
    context_depth_limit: ClassVar[int] = CONTEXT_DEPTH_LIMIT
    local_namespace_limit: ClassVar[int | None] = LOCAL_NAMESPACE_LIMIT_BYTES
    template_class = _SandboxTemplate

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(undefined=_MissingVariable, autoescape=autoescape, strict_filters=True)

    def setup_tags_and_filters(self, *, extra: bool = False) -> None:
        super().setup_tags_and_filters(extra=extra)
        for tag_name in _DISABLED_TAGS:
            self.tags.pop(tag_name, None)
        self.filters["json"] = _json_filter
        self.filters = {name: _guard_filter(name, func) for name, func in self.filters.items()}


_PLAIN_ENV: Final = SandboxedEnvironment(autoescape=False)
_HTML_ENV: Final = SandboxedEnvironment(autoescape=True)


def _reason(error: BaseException) -> str:
    if isinstance(error, LiquidError):
        message = str(error.message)
        location = error.context()
        if location is not None:
            return f"{message} (line {location[0]}, column {location[1]})"
        return message
    return f"{type(error).__name__}: {error}"


def _kind(error: BaseException) -> str:
    if isinstance(error, UndefinedError):
        return "undefined"
    if isinstance(error, (LiquidSyntaxError, UnknownFilterError)):
        return "syntax"
    if isinstance(error, ResourceLimitError):
        return "limit"
    return "error"


@functools.lru_cache(maxsize=COMPILED_TEMPLATE_CACHE_SIZE)
def _compile(source: str, html: bool) -> BoundTemplate:
    env = _HTML_ENV if html else _PLAIN_ENV
    return env.from_string(source)


def _compiled(field: str, source: str, *, html: bool) -> BoundTemplate:
    if len(source) > MAX_TEMPLATE_SOURCE_CHARS:
        raise RenderError(field, "template source too large", kind="limit")
    try:
        return _compile(source, html)
    except LiquidError as error:
        raise RenderError(field, _reason(error), kind=_kind(error)) from error


def validate_template(
    source: str, *, field: str = "template", roots: Collection[str] = CONTEXT_ROOTS
) -> None:
    """Reject what would fail every render: syntax, unknown filters/tags, unknown roots."""
    template = _compiled(field, source, html=False)
    unknown_filters = sorted(set(template.filter_names()) - set(_PLAIN_ENV.filters))
    if unknown_filters:
        raise RenderError(field, f"unknown filter '{unknown_filters[0]}'", kind="syntax")
    unknown_roots = sorted(set(template.global_variables()) - set(roots))
    if unknown_roots:
        raise RenderError(
            field,
            f"unknown variable '{unknown_roots[0]}' (expected one of {sorted(roots)})",
            kind="syntax",
        )


def render_context(
    *,
    user: Mapping[str, Any],
    event: Mapping[str, Any],
    campaign: Mapping[str, Any],
) -> dict[str, Any]:
    """The render context; `trigger` is an alias of `event`."""
    return {"user": user, "event": event, "trigger": event, "campaign": campaign}


def single_line(text: str) -> str:
    """Header-safe text: line breaks and control characters collapse to one space."""
    return _LINE_BREAKS_AND_CONTROLS.sub(" ", text).strip()


def render_field(
    field: str,
    source: str,
    context: Mapping[str, Any],
    *,
    html: bool = False,
    deadline_s: float = RENDER_DEADLINE_S,
) -> str:
    template = _compiled(field, source, html=html)
    token = _render_deadline.set(time.monotonic() + deadline_s)
    try:
        return template.render(context)
    except LiquidError as error:
        raise RenderError(field, _reason(error), kind=_kind(error)) from error
    except Exception as error:
        # Same template + same data fails the same way every time: report, don't crash.
        raise RenderError(field, _reason(error)) from error
    finally:
        _render_deadline.reset(token)


def render_message(
    fields: Mapping[str, str],
    context: Mapping[str, Any],
    *,
    html_fields: Collection[str] = HTML_FIELDS,
    header_fields: Collection[str] = HEADER_FIELDS,
    deadline_s: float = RENDER_DEADLINE_S,
    json_fields: Collection[str] = JSON_FIELDS,
) -> dict[str, str]:
    """Render every field of a message definition; raises RenderError on the first failure.

    `json_fields` (the webhook `payload`) hold a JSON document whose string leaves are templates:
    each leaf is rendered on its own and the document re-serialized, so user data can never
    change the document's shape.
    """
    rendered: dict[str, str] = {}
    for field, source in fields.items():
        if field in json_fields:
            rendered[field] = render_json(field, source, context, deadline_s=deadline_s)
            continue
        text = render_field(
            field, source, context, html=field in html_fields, deadline_s=deadline_s
        )
        rendered[field] = single_line(text) if field in header_fields else text
    return rendered


def render_json(
    field: str, source: str, context: Mapping[str, Any], *, deadline_s: float = RENDER_DEADLINE_S
) -> str:
    """Render the string leaves of a JSON document (given as text); return the JSON text."""
    try:
        document = json.loads(source)
    except ValueError as error:
        raise RenderError(field, f"is not valid JSON: {error}") from None

    def render(value: Any, path: str) -> Any:
        if isinstance(value, str):
            return render_field(path, value, context, deadline_s=deadline_s)
        if isinstance(value, dict):
            return {key: render(item, f"{path}.{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [render(item, f"{path}[{index}]") for index, item in enumerate(value)]
        return value

    return json.dumps(render(document, field), ensure_ascii=False, separators=(",", ":"))
