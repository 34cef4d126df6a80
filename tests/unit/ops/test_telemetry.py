"""Trace context helpers, exporter selection, metrics addresses and JSON logs (no I/O)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from nudge import metrics, telemetry
from nudge.config import ConfigError
from nudge.logs import WORKSPACE_ATTRIBUTE, JsonFormatter

TRACEPARENT_A = "00-" + "a" * 32 + "-" + "1" * 16 + "-01"
TRACEPARENT_A2 = "00-" + "a" * 32 + "-" + "2" * 16 + "-01"
TRACEPARENT_B = "00-" + "b" * 32 + "-" + "3" * 16 + "-01"


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Spans of `telemetry.tracer()` go to memory for this test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", lambda: provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def test_a_batch_with_causes_in_one_trace_continues_it_and_links_each(
    exported: InMemorySpanExporter,
) -> None:
    causes = [telemetry.span_context_of(TRACEPARENT_A), telemetry.span_context_of(TRACEPARENT_A2)]
    with telemetry.batch_span("append events", causes):
        pass
    [span] = exported.get_finished_spans()
    assert span.context is not None
    assert span.parent is not None
    assert format(span.context.trace_id, "032x") == "a" * 32
    assert format(span.parent.span_id, "016x") == "1" * 16
    assert [format(link.context.span_id, "016x") for link in span.links] == ["1" * 16, "2" * 16]


def test_a_batch_with_causes_in_several_traces_is_a_new_linked_trace(
    exported: InMemorySpanExporter,
) -> None:
    causes = [telemetry.span_context_of(t) for t in (TRACEPARENT_A, TRACEPARENT_B, None, "junk")]
    with telemetry.batch_span("project events", causes):
        pass
    [span] = exported.get_finished_spans()
    assert span.parent is None
    assert {format(link.context.trace_id, "032x") for link in span.links} == {"a" * 32, "b" * 32}


def test_a_delayed_message_starts_a_new_trace_linked_to_the_one_that_armed_it(
    exported: InMemorySpanExporter,
) -> None:
    armed_by = telemetry.span_context_of(TRACEPARENT_A)
    with telemetry.producer_span("nudge.timers.rules", "t:1", causes=[armed_by], new_trace=True):
        headers = {"Nats-Msg-Id": "t:1"}
        traceparent = telemetry.current_traceparent()
    [span] = exported.get_finished_spans()
    assert span.parent is None
    assert span.kind is SpanKind.PRODUCER
    assert span.name == "send nudge.timers.rules"
    assert format(span.context.trace_id, "032x") != "a" * 32
    assert [link.context for link in span.links] == [armed_by]
    assert span.attributes is not None
    assert span.attributes["messaging.system"] == "nats"
    assert span.attributes["messaging.message.id"] == "t:1"

    # The consumer continues the producer's trace and links to it.
    headers["traceparent"] = traceparent
    with telemetry.consumer_span("nudge.timers.rules", headers, consumer_group="rules-timers"):
        pass
    consumer = exported.get_finished_spans()[1]
    assert consumer.kind is SpanKind.CONSUMER
    assert consumer.parent is not None
    assert consumer.parent.span_id == span.context.span_id
    assert [link.context.span_id for link in consumer.links] == [span.context.span_id]


def test_a_producer_continues_a_stored_traceparent(exported: InMemorySpanExporter) -> None:
    with telemetry.producer_span("nudge.dispatch.ws.email", "send-1", parent=TRACEPARENT_B):
        pass
    [span] = exported.get_finished_spans()
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == "3" * 16


def test_a_consumer_without_trace_headers_starts_a_trace(exported: InMemorySpanExporter) -> None:
    with telemetry.consumer_span("nudge.events.ws", None, consumer_group="rules-wakeup"):
        pass
    [span] = exported.get_finished_spans()
    assert span.parent is None
    assert span.links == ()


def test_exporters_follow_the_standard_variables() -> None:
    assert telemetry.exporters_from_env({}) == []
    assert telemetry.exporters_from_env({"OTEL_TRACES_EXPORTER": "none"}) == []
    [grpc_exporter] = telemetry.exporters_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert type(grpc_exporter).__module__.endswith("proto.grpc.trace_exporter")
    [http_exporter] = telemetry.exporters_from_env(
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    )
    assert type(http_exporter).__module__.endswith("proto.http.trace_exporter")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        telemetry.exporters_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert telemetry.service_name("rules", {}) == "nudge-rules"
    assert telemetry.service_name("rules", {"OTEL_SERVICE_NAME": "crm-rules"}) == "crm-rules"


def test_metrics_addresses_default_per_service_and_can_be_turned_off() -> None:
    assert metrics.metrics_address("dispatch", {}) == "127.0.0.1:9104"
    assert metrics.metrics_address("ingest", {"NUDGE_INGEST_METRICS_ADDR": ":9200"}) == (
        "127.0.0.1:9200"
    )
    assert metrics.metrics_address("rules", {"NUDGE_RULES_METRICS_ADDR": "off"}) is None
    with pytest.raises(ConfigError, match="NUDGE_SCHEDULER_METRICS_ADDR"):
        metrics.metrics_address("scheduler", {"NUDGE_SCHEDULER_METRICS_ADDR": "nine"})


def test_json_logs_carry_trace_ids_and_the_workspace_of_the_current_span() -> None:
    provider = TracerProvider()
    formatter = JsonFormatter("dispatch")
    record = logging.LogRecord("nudge.dispatch", logging.INFO, __file__, 1, "sent %s", ("x",), None)
    outside = json.loads(formatter.format(record))
    assert "trace_id" not in outside
    assert "workspace" not in outside
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span(
        "smtp send", attributes={WORKSPACE_ATTRIBUTE: "acme"}
    ) as span:
        inside = json.loads(formatter.format(record))
    assert inside["msg"] == "sent x"
    assert inside["service"] == "dispatch"
    assert inside["workspace"] == "acme"
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert trace.get_current_span() is trace.INVALID_SPAN
