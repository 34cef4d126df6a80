"""Prometheus metrics of the four services, served over HTTP by each service process.

Every family is defined here, once, with OTel-style names (``_total``, ``_seconds``) and
low-cardinality labels only (service, channel, outcome, reader, stream, consumer, gRPC method
and code; never user, workspace or send ids). docs/operations.md explains each one.

Families are grouped in one registry per service plus a shared one, so a service's endpoint
shows only what that service can move. `serve_metrics` starts the endpoint (a daemon thread) at
``$NUDGE_<SERVICE>_METRICS_ADDR`` (defaults 127.0.0.1:9101..9104; ``off`` disables it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from nats.js import JetStreamContext
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from nudge import eventstore
from nudge.config import ConfigError, env_address
from nudge.db import Queryable

log = logging.getLogger("nudge.metrics")

DEFAULT_METRICS_ADDRESSES = {
    "ingest": "127.0.0.1:9101",
    "rules": "127.0.0.1:9102",
    "scheduler": "127.0.0.1:9103",
    "dispatch": "127.0.0.1:9104",
}
DISABLED = frozenset({"off", "none", "-"})

SHARED = CollectorRegistry()
REGISTRIES = {name: CollectorRegistry() for name in DEFAULT_METRICS_ADDRESSES}

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

# --- every service ---------------------------------------------------------------------------

READY = Gauge(
    "nudge_ready",
    "1 while the service reports SERVING (all readiness checks pass), else 0.",
    registry=SHARED,
)
READY_CHECK = Gauge(
    "nudge_ready_check",
    "1 while this readiness check passes, else 0.",
    ["check"],
    registry=SHARED,
)
GRPC_HANDLED = Counter(
    "nudge_grpc_server_handled",
    "gRPC calls completed by this server, by full method and status code.",
    ["method", "code"],
    registry=SHARED,
)
GRPC_SECONDS = Histogram(
    "nudge_grpc_server_handling_seconds",
    "Time from receiving a gRPC call to its response (ingest: the Track/Identify latency).",
    ["method"],
    buckets=_LATENCY_BUCKETS,
    registry=SHARED,
)
READER_LAG_EVENTS = Gauge(
    "nudge_reader_lag_events",
    "Committed events a store reader has not processed yet (sampled; capped at 100000).",
    ["reader"],
    registry=SHARED,
)
READER_LAG_SECONDS = Gauge(
    "nudge_reader_lag_seconds",
    "Age of the oldest event a store reader has not processed yet (0 when caught up).",
    ["reader"],
    registry=SHARED,
)
CONSUMER_PENDING = Gauge(
    "nudge_nats_consumer_pending_messages",
    "Messages in the stream not yet delivered to this durable consumer (sampled).",
    ["stream", "consumer"],
    registry=SHARED,
)
CONSUMER_ACK_PENDING = Gauge(
    "nudge_nats_consumer_ack_pending_messages",
    "Messages delivered to this durable consumer and not acknowledged yet (sampled).",
    ["stream", "consumer"],
    registry=SHARED,
)

# --- ingest ------------------------------------------------------------------------------------

INGEST_EVENTS = Counter(
    "nudge_ingest_events",
    "Events received by Track and Identify, by outcome: accepted, duplicate, rejected.",
    ["outcome"],
    registry=REGISTRIES["ingest"],
)
APPEND_BATCH_EVENTS = Histogram(
    "nudge_store_append_batch_events",
    "Events written per event-store transaction (group commit of concurrent requests).",
    buckets=_BATCH_BUCKETS,
    registry=REGISTRIES["ingest"],
)
APPEND_SECONDS = Histogram(
    "nudge_store_append_seconds",
    "Duration of one event-store append transaction, commit included.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRIES["ingest"],
)
RELAY_EVENTS = Counter(
    "nudge_relay_published_events",
    "Events the relay published to NATS (acknowledged by JetStream).",
    registry=REGISTRIES["ingest"],
)

# --- rules -------------------------------------------------------------------------------------

PROJECTED_EVENTS = Counter(
    "nudge_rules_projected_events",
    "Events folded into user states by the rules projection.",
    registry=REGISTRIES["rules"],
)
DECISIONS = Counter(
    "nudge_rules_decisions",
    "Campaign decisions recorded, by kind (triggered, send_planned, suppressed...).",
    ["kind"],
    registry=REGISTRIES["rules"],
)

# --- scheduler ---------------------------------------------------------------------------------

TIMERS_PENDING = Gauge(
    "nudge_timers_pending",
    "Armed timers not fired or cancelled yet (sampled).",
    registry=REGISTRIES["scheduler"],
)
TIMERS_OVERDUE = Gauge(
    "nudge_timers_overdue",
    "Pending timers whose due time has passed (sampled; normally 0).",
    registry=REGISTRIES["scheduler"],
)
TIMERS_FIRED = Counter(
    "nudge_timers_fired",
    "Timers fired (published as TimerFired and marked fired).",
    registry=REGISTRIES["scheduler"],
)
TIMER_LATENESS = Histogram(
    "nudge_timer_lateness_seconds",
    "How long after its due time each timer fired (by the database clock).",
    buckets=_LATENESS_BUCKETS,
    registry=REGISTRIES["scheduler"],
)

# --- dispatch ----------------------------------------------------------------------------------

SENDS = Counter(
    "nudge_dispatch_sends",
    "Sends that reached a final state, by channel and outcome: sent, dead (dead letter), "
    "ambiguous (outcome unknown, parked), suppressed.",
    ["channel", "outcome"],
    registry=REGISTRIES["dispatch"],
)
RETRIES = Counter(
    "nudge_dispatch_retries",
    "Send attempts that failed transiently and were scheduled for another attempt.",
    ["channel"],
    registry=REGISTRIES["dispatch"],
)
PROVIDER_REQUESTS = Counter(
    "nudge_dispatch_provider_requests",
    "Requests to providers (SMTP, webhook...), by channel and result: ok, transient, "
    "permanent, ambiguous.",
    ["channel", "result"],
    registry=REGISTRIES["dispatch"],
)
PROVIDER_SECONDS = Histogram(
    "nudge_dispatch_provider_request_seconds",
    "Duration of one provider request (SMTP session, webhook POST), whatever its result.",
    ["channel"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRIES["dispatch"],
)


# --------------------------------------------------------------------------------------------
# recording helpers (one call per site in service code)


def count_ingested(outcomes: Iterable[str]) -> None:
    """Count Track/Identify results (``accepted``, ``duplicate``, ``rejected``): one
    increment per outcome, not per event."""
    for outcome, count in collections.Counter(outcomes).items():
        INGEST_EVENTS.labels(outcome).inc(count)


def count_projection(events: int, decision_kinds: Iterable[str]) -> None:
    """Count one applied projection batch and the decisions it recorded."""
    PROJECTED_EVENTS.inc(events)
    for kind in decision_kinds:
        DECISIONS.labels(kind).inc()


def count_send(channel: str, outcome: str) -> None:
    """Count a send reaching a final state."""
    SENDS.labels(channel, outcome).inc()


def count_retry(channel: str) -> None:
    """Count a send attempt scheduled for retry."""
    RETRIES.labels(channel).inc()


# --------------------------------------------------------------------------------------------
# the endpoint


class _Union(Collector):
    """The families of several registries, as one collector."""

    def __init__(self, registries: Sequence[CollectorRegistry]) -> None:
        self._registries = registries

    def collect(self) -> Iterator[Metric]:
        for registry in self._registries:
            yield from registry.collect()


def registry_for(service: str) -> CollectorRegistry:
    """What a service's endpoint serves: its families, the shared ones, process and runtime."""
    registry = CollectorRegistry()
    registry.register(_Union([SHARED, REGISTRIES[service]]))
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def metrics_variable(service: str) -> str:
    """``NUDGE_<SERVICE>_METRICS_ADDR``."""
    return f"NUDGE_{service.upper()}_METRICS_ADDR"


def metrics_address(service: str, env: Mapping[str, str] | None = None) -> str | None:
    """The configured metrics listen address of a service, or None when disabled."""
    source = os.environ if env is None else env
    name = metrics_variable(service)
    raw = source.get(name, "").strip()
    if raw.lower() in DISABLED:
        return None
    return env_address(name, DEFAULT_METRICS_ADDRESSES[service], source)


def serve_metrics(service: str, env: Mapping[str, str] | None = None) -> str | None:
    """Start the service's ``/metrics`` endpoint; return its address (None when disabled).

    Raises ConfigError naming the variable when the address cannot be bound.
    """
    address = metrics_address(service, env)
    if address is None:
        return None
    host, _, port = address.rpartition(":")
    try:
        start_http_server(int(port), host.strip("[]"), registry=registry_for(service))
    except OSError as error:
        problem = f"cannot listen on {address}: {error}"
        raise ConfigError(metrics_variable(service), problem) from None
    log.info("metrics on http://%s/metrics", address)
    return address


# --------------------------------------------------------------------------------------------
# gRPC server metrics


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times unary gRPC calls by method and status code (health checks excluded)."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or method.startswith("/grpc."):
            return handler
        behavior: Any = handler.unary_unary

        async def timed(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                return await behavior(request, context)
            except BaseException:
                code = _code_name(context.code()) or "UNKNOWN"
                raise
            finally:
                if code == "OK":
                    code = _code_name(context.code()) or "OK"
                GRPC_SECONDS.labels(method).observe(time.perf_counter() - started)
                GRPC_HANDLED.labels(method, code).inc()

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _code_name(code: Any) -> str | None:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return None


# --------------------------------------------------------------------------------------------
# sampled gauges (lags, queue depths): read every few seconds by a background loop

Sampler = Callable[[], Awaitable[None]]


def reader_lag_sampler(pool: Queryable, reader: str) -> Sampler:
    """Sample how far the event-store reader `reader` (``relay``, ``rules``) is behind."""

    async def sample() -> None:
        events, seconds = await eventstore.reader_lag(pool, reader)
        READER_LAG_EVENTS.labels(reader).set(events)
        READER_LAG_SECONDS.labels(reader).set(seconds)

    return sample


def consumer_sampler(js: JetStreamContext, stream: str, durable: str) -> Sampler:
    """Sample the backlog of a durable JetStream consumer."""

    async def sample() -> None:
        info = await js.consumer_info(stream, durable)
        CONSUMER_PENDING.labels(stream, durable).set(info.num_pending or 0)
        CONSUMER_ACK_PENDING.labels(stream, durable).set(info.num_ack_pending or 0)

    return sample


def timers_sampler(count: Callable[[], Awaitable[tuple[int, int]]]) -> Sampler:
    """Sample (pending, overdue) timer counts from `count`."""

    async def sample() -> None:
        pending, overdue = await count()
        TIMERS_PENDING.set(pending)
        TIMERS_OVERDUE.set(overdue)

    return sample


async def run_samplers(
    samplers: Sequence[Sampler], interval_s: float = 5.0, timeout_s: float = 5.0
) -> None:
    """Run every sampler each `interval_s` forever; a failing one keeps its last value (the
    readiness checks report outages, not this loop)."""
    while True:
        for sample in samplers:
            try:
                async with asyncio.timeout(timeout_s):
                    await sample()
            except Exception as error:
                log.debug("metrics sample failed: %r", error)
        await asyncio.sleep(interval_s)
