"""An OTLP/gRPC trace receiver for tests, built on opentelemetry-proto (ECOSYSTEM.md §4.5).

No trace backend installs here (Jaeger and the collector ship no wheel), so tests point the
services' stock OTLP exporters at this receiver and assert on what arrives:

    with OtlpReceiver() as receiver:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        ...
        spans = receiver.wait_for(lambda spans: ..., timeout_s=20)

It runs a synchronous grpc server on its own threads, so it works from sync and async tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

from nudge.dev.stack import free_port

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened (ids as lowercase hex)."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    links: tuple[tuple[str, str], ...]
    """(trace_id, span_id) of each link."""
    attributes: dict[str, Any]
    status_code: int

    def linked_to(self, other: ReceivedSpan) -> bool:
        """True when this span has a link to `other`."""
        return (other.trace_id, other.span_id) in self.links


def _value(value: common_pb2.AnyValue) -> Any:
    field = value.WhichOneof("value")
    if field is None:
        return None
    if field == "array_value":
        return [_value(v) for v in value.array_value.values]
    if field == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, field)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            kind=_KINDS.get(span.kind, str(span.kind)),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            links=tuple(
                                (link.trace_id.hex(), link.span_id.hex()) for link in span.links
                            ),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status_code=span.status.code,
                        )
                    )
        self._receiver.add(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Collects every span exported to it over OTLP/gRPC."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        """Value for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (plaintext gRPC)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        """Listen on 127.0.0.1:<port>."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add(_TraceService(self), server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.stop(grace=1).wait()
            self._server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, spans: list[ReceivedSpan]) -> None:
        """Record spans (called by the gRPC handler)."""
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Everything received so far."""
        with self._changed:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans of one trace."""
        return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(
        self, condition: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 20.0
    ) -> list[ReceivedSpan]:
        """Block until `condition(spans)` holds; return the spans. AssertionError on timeout,
        listing what arrived."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not condition(list(self._spans)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"spans not as expected after {timeout_s}s; received:\n"
                        + describe(self._spans)
                    )
                self._changed.wait(min(remaining, 0.5))
            return list(self._spans)


def describe(spans: list[ReceivedSpan]) -> str:
    """One line per span: trace, span<-parent, service, kind, name and links (ids shortened)."""
    return "\n".join(_lines(spans))


def _lines(spans: list[ReceivedSpan]) -> Iterator[str]:
    for span in spans:
        links = ",".join(f"{t[:8]}/{s[:8]}" for t, s in span.links)
        yield (
            f"  {span.trace_id[:8]} {span.span_id[:8]}<-{span.parent_span_id[:8] or '-':8} "
            f"{span.service:16} {span.kind:9} {span.name} links=[{links}]"
        )
