"""Tracing: OpenTelemetry configured from the standard ``OTEL_*`` variables, and the messaging
spans Nudge writes by hand for NATS (there is no official nats-py instrumentation).

`setup_tracing` runs once per service process, in its ``__main__`` (never at import time). It
installs an SDK tracer provider whether or not spans are exported, so trace context is always
created and propagated (gRPC metadata, NATS headers, event metadata) and logs carry trace ids;
spans leave the process only when an exporter is configured:

* ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console`` or ``none`` (comma-separated). Default:
  ``otlp`` when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
  set, else ``none``.
* ``OTEL_EXPORTER_OTLP_PROTOCOL`` / ``..._TRACES_PROTOCOL``: ``grpc`` (default) or
  ``http/protobuf``; the exporters read endpoint, headers, timeout and TLS settings themselves.
* ``OTEL_SERVICE_NAME`` (default ``nudge-<service>``), ``OTEL_RESOURCE_ATTRIBUTES``,
  ``OTEL_TRACES_SAMPLER`` / ``..._ARG`` and ``OTEL_BSP_*`` are read by the SDK.

Messaging spans follow the OTel messaging conventions (ECOSYSTEM.md §4.2): a PRODUCER span
``send <subject>`` around each publish whose context goes into the message headers, and a
CONSUMER span ``process <subject>`` that continues the producer's trace and links to it. Work
that gathers many causes (a group commit, a relay batch) links to each; it joins its cause's
trace when there is only one. No attribute carries user data: ids, names and counts only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Link, SpanContext, SpanKind

from nudge.config import ConfigError

log = logging.getLogger("nudge.telemetry")

TRACER_NAME = "nudge"
MAX_LINKS = 64
"""Links per batch span; the SDK keeps at most 128 by default (OTEL_SPAN_LINK_COUNT_LIMIT)."""
EXCLUDED_GRPC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")

_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def service_name(service: str, env: Mapping[str, str] | None = None) -> str:
    """``$OTEL_SERVICE_NAME``, else ``nudge-<service>``."""
    source = os.environ if env is None else env
    return source.get("OTEL_SERVICE_NAME") or f"nudge-{service}"


def exporters_from_env(env: Mapping[str, str] | None = None) -> list[SpanExporter]:
    """The span exporters the environment asks for (none when no collector is configured)."""
    source = os.environ if env is None else env
    endpoint = source.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or source.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    names = source.get("OTEL_TRACES_EXPORTER") or ("otlp" if endpoint else "none")
    exporters: list[SpanExporter] = []
    for name in (n.strip().lower() for n in names.split(",") if n.strip()):
        if name == "none":
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            exporters.append(_otlp_exporter(source))
        else:
            raise ConfigError("OTEL_TRACES_EXPORTER", f"unsupported exporter {name!r}")
    return exporters


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter()
    raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL", f"unsupported protocol {protocol!r}")


class _DropOrphanQueries(SpanProcessor):
    """Passes spans on, except database queries that belong to no operation.

    Background loops poll the database every second (relay, projection, sweeper, clock); as
    root spans those queries would bury real traces. A query inside a traced operation (a
    request, a batch, a send) is kept as that operation's child.
    """

    def __init__(self, inner: SpanProcessor) -> None:
        self._inner = inner

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        self._inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        attributes = span.attributes or {}
        orphan_query = (
            span.parent is None
            and span.kind is SpanKind.CLIENT
            and ("db.system" in attributes or "db.system.name" in attributes)
        )
        if not orphan_query:
            self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def setup_tracing(service: str, env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Install the tracer provider of a service process and the gRPC and asyncpg
    instrumentations; return the provider (its spans are flushed at process exit).

    With no exporter configured nothing is installed and None is returned: spans are then the
    API's non-recording ones, which still carry an incoming `traceparent` onward (events,
    outbox rows, NATS headers), but cost next to nothing. Recording spans nobody exports cost
    the rules projection a third of its CPU (measured with `make bench --profile rules`).

    Call once, before creating gRPC servers, channels or database pools. ConfigError names the
    variable when the environment asks for an unknown exporter or protocol.
    """
    global _provider, _tracer
    if _provider is not None:
        return _provider
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
        filters,
    )

    exporters = exporters_from_env(env)
    if not exporters:
        return None
    resource = Resource.create(
        {"service.name": service_name(service, env), "service.namespace": "nudge"}
    )
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(_DropOrphanQueries(BatchSpanProcessor(exporter)))
    trace.set_tracer_provider(provider)

    not_plumbing = filters.negate(
        filters.any_of(*(filters.service_name(name) for name in EXCLUDED_GRPC_SERVICES))
    )
    # The instrumentation packages ship no type hints.
    GrpcAioInstrumentorServer(filter_=not_plumbing).instrument(  # type: ignore[no-untyped-call]
        tracer_provider=provider
    )
    GrpcAioInstrumentorClient(filter_=not_plumbing).instrument(  # type: ignore[no-untyped-call]
        tracer_provider=provider
    )
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    _provider = provider
    _tracer = provider.get_tracer(TRACER_NAME)
    if exporters:
        log.info("exporting traces as %s", resource.attributes.get("service.name"))
    return provider


def tracer() -> trace.Tracer:
    """Nudge's tracer (the global provider's; a no-op one before `setup_tracing`)."""
    return _tracer if _tracer is not None else trace.get_tracer(TRACER_NAME)


# --------------------------------------------------------------------------------------------
# carrying context: W3C traceparent strings (event metadata, outbox rows, timers)


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span, or "" when there is none."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def span_context_of(traceparent: str | None) -> SpanContext | None:
    """The remote span context a ``traceparent`` names, or None when absent or malformed."""
    if not traceparent:
        return None
    span = trace.get_current_span(propagate.extract({"traceparent": traceparent}))
    context = span.get_span_context()
    return context if context.is_valid else None


def context_of(traceparent: str | None) -> otel_context.Context:
    """A context whose parent is the span a ``traceparent`` names (empty: a new trace)."""
    remote = span_context_of(traceparent)
    if remote is None:
        return otel_context.Context()
    return trace.set_span_in_context(trace.NonRecordingSpan(remote), otel_context.Context())


def links_to(contexts: Iterable[SpanContext | None]) -> list[Link]:
    """One link per distinct valid span context, at most MAX_LINKS."""
    seen: set[tuple[int, int]] = set()
    links: list[Link] = []
    for context in contexts:
        if context is None or not context.is_valid:
            continue
        key = (context.trace_id, context.span_id)
        if key in seen:
            continue
        seen.add(key)
        links.append(Link(context))
        if len(links) >= MAX_LINKS:
            break
    return links


def _parent_of(links: Sequence[Link], new_trace: bool) -> otel_context.Context:
    # A batch with causes in exactly one trace continues that trace (the common case of one
    # request or one event); causes in several traces make the batch a new trace linked to all.
    if not new_trace and links and len({link.context.trace_id for link in links}) == 1:
        return trace.set_span_in_context(
            trace.NonRecordingSpan(links[0].context), otel_context.Context()
        )
    return otel_context.Context()


@contextmanager
def batch_span(
    name: str,
    causes: Iterable[SpanContext | None],
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    new_trace: bool = False,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """A current span for work done on behalf of several causes: linked to each, and a child of
    the only one when they all share a trace (unless `new_trace`: delayed work starts its own
    trace, ECOSYSTEM.md §4.2)."""
    links = links_to(causes)
    with tracer().start_as_current_span(
        name,
        context=_parent_of(links, new_trace),
        kind=kind,
        links=links,
        attributes=dict(attributes or {}),
    ) as span:
        yield span


@contextmanager
def continued_span(
    name: str,
    traceparent: str | None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """A current span continuing the trace of a stored ``traceparent`` and linked to the
    current span; without a valid ``traceparent``, simply a child of the current span."""
    remote = span_context_of(traceparent)
    if remote is None:
        with tracer().start_as_current_span(
            name, kind=kind, attributes=dict(attributes or {})
        ) as span:
            yield span
        return
    with tracer().start_as_current_span(
        name,
        context=context_of(traceparent),
        kind=kind,
        links=links_to([trace.get_current_span().get_span_context()]),
        attributes=dict(attributes or {}),
    ) as span:
        yield span


@contextmanager
def traceparent_as_current(traceparent: str | None) -> Iterator[None]:
    """Make the span a stored ``traceparent`` names the current one (no new span): calls made
    inside (gRPC, instrumented) continue that trace. Without one, nothing changes."""
    if span_context_of(traceparent) is None:
        yield
        return
    token = otel_context.attach(context_of(traceparent))
    try:
        yield
    finally:
        otel_context.detach(token)


# --------------------------------------------------------------------------------------------
# messaging spans (NATS JetStream)


def _messaging_attributes(subject: str, operation: str, kind: str) -> dict[str, Any]:
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": kind,
        "messaging.operation.name": operation,
    }


@contextmanager
def producer_span(
    subject: str,
    msg_id: str,
    *,
    parent: str | None = None,
    causes: Iterable[SpanContext | None] | None = None,
    new_trace: bool = False,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """The PRODUCER span of one publish; build the message headers inside it
    (`nudge.bus.trace_headers`) so they carry its context.

    The span continues `parent` (a stored traceparent) when given, else the current span. With
    `causes` it is a batch span (see `batch_span`) linked to each cause; `new_trace` makes it
    the root of a new trace even when there is a single cause.
    """
    values = {
        **_messaging_attributes(subject, "publish", "send"),
        "messaging.message.id": msg_id,
        **(attributes or {}),
    }
    name = f"send {subject}"
    if causes is not None:
        with batch_span(
            name, causes, kind=SpanKind.PRODUCER, new_trace=new_trace, attributes=values
        ) as span:
            yield span
        return
    context = context_of(parent) if parent else None
    with tracer().start_as_current_span(
        name, context=context, kind=SpanKind.PRODUCER, attributes=values
    ) as span:
        yield span


@contextmanager
def consumer_span(
    subject: str,
    headers: Mapping[str, str] | None,
    *,
    consumer_group: str,
    msg_id: str | None = None,
    operation: str = "process",
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """The CONSUMER span processing one message: a child of the producer span named in the
    headers, and linked to it (the link is what survives batching and redelivery)."""
    context = propagate.extract(dict(headers or {}))
    producer = trace.get_current_span(context).get_span_context()
    values = {
        **_messaging_attributes(subject, operation, operation),
        "messaging.consumer.group.name": consumer_group,
        **(attributes or {}),
    }
    if msg_id:
        values["messaging.message.id"] = msg_id
    with tracer().start_as_current_span(
        f"{operation} {subject}",
        context=context,
        kind=SpanKind.CONSUMER,
        links=links_to([producer]),
        attributes=values,
    ) as span:
        yield span
