"""One trace from the client's Track call to the provider request, seen by an OTLP receiver.

The four services run as processes exporting to `nudge.testing.otlp.OtlpReceiver` with their
stock OTLP exporters (only the standard OTEL_* variables set). The client sends a known
`traceparent` in its gRPC metadata, as an instrumented SDK would.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import yaml

from nudge.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from nudge.protoconv import dict_to_struct
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc
from nudge.testing.fixtures import run_async
from nudge.testing.otlp import OtlpReceiver, ReceivedSpan, describe
from nudge.testing.services import ServiceProcesses
from nudge.testing.sinks import SmtpFault, SmtpSink
from tests.e2e.conftest import _make_key

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "campaigns"
EMAIL = "grace@example.test"
FIRST_NAME = "Grace"


@dataclass
class TracedStack:
    services: ServiceProcesses
    receiver: OtlpReceiver
    smtp: SmtpSink
    api_key: str
    prefix: str
    workspace_id: str


@pytest.fixture
def traced(
    database_url: str, nats_url: str, test_id: str, tmp_path: Path, smtp_sink: SmtpSink
) -> Iterator[TracedStack]:
    workspace_id = f"ws-{test_id}"
    api_key = run_async(_make_key(database_url, workspace_id))
    with OtlpReceiver() as receiver:
        services = ServiceProcesses.configure(
            database_url=database_url,
            nats_url=nats_url,
            nats_prefix=f"t{test_id}",
            log_dir=tmp_path / "logs",
            extra_env={
                "NUDGE_SMTP_URL": smtp_sink.url,
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            },
        )
        try:
            services.start_all()
            yield TracedStack(services, receiver, smtp_sink, api_key, f"t{test_id}", workspace_id)
        finally:
            services.stop_all()


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def _apply(stack: TracedStack, definition: dict[str, Any]) -> None:
    auth = (("authorization", f"Bearer {stack.api_key}"),)
    async with grpc.aio.insecure_channel(stack.services.addresses["rules"]) as channel:
        await rules_pb2_grpc.RulesServiceStub(channel).ApplyCampaign(
            rules_pb2.ApplyCampaignRequest(definition=dict_to_struct(definition)),
            metadata=auth,
            timeout=10,
        )


async def _track(stack: TracedStack, traceparent: str, event: ingest_pb2.Event) -> None:
    metadata = (("authorization", f"Bearer {stack.api_key}"), ("traceparent", traceparent))
    async with grpc.aio.insecure_channel(stack.services.addresses["ingest"]) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        response = await ingest.Track(
            ingest_pb2.TrackRequest(events=[event]), metadata=metadata, timeout=10
        )
    assert response.results[0].status == ingest_pb2.EVENT_STATUS_ACCEPTED


async def _identify(stack: TracedStack) -> None:
    auth = (("authorization", f"Bearer {stack.api_key}"),)
    traits = {"email": EMAIL, "first_name": FIRST_NAME}
    async with grpc.aio.insecure_channel(stack.services.addresses["ingest"]) as channel:
        await ingest_pb2_grpc.IngestServiceStub(channel).Identify(
            ingest_pb2.IdentifyRequest(user_id="grace", traits=dict_to_struct(traits)),
            metadata=auth,
            timeout=10,
        )


def _one(receiver: OtlpReceiver, trace_id: str, service: str, kind: str, name: str) -> ReceivedSpan:
    """The one span of `trace_id` with that service, kind and name (waiting for its export:
    a span is exported when it ends, which can be after the spans it caused)."""

    def matches(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [
            s
            for s in spans
            if s.trace_id == trace_id and s.service == service and s.kind == kind and s.name == name
        ]

    spans = receiver.wait_for(lambda spans: bool(matches(spans)), timeout_s=20)
    found = matches(spans)
    assert len(found) == 1, (
        f"expected one {service} {kind} {name!r}, found {len(found)} in\n"
        f"{describe(receiver.trace(trace_id))}"
    )
    return found[0]


def _has(service: str, kind: str, name: str) -> Callable[[list[ReceivedSpan]], bool]:
    def condition(spans: list[ReceivedSpan]) -> bool:
        return any(s.service == service and s.kind == kind and s.name == name for s in spans)

    return condition


def test_one_trace_from_track_to_smtp_and_a_delayed_send_links_back(
    traced: TracedStack,
) -> None:
    prefix, workspace = traced.prefix, traced.workspace_id
    receiver = traced.receiver
    immediate = yaml.safe_load((EXAMPLES / "order-shipped.yaml").read_text())
    delayed = immediate | {"id": "order-followup", "delay": "1s"}
    delayed["trigger"] = {"event": "order_delivered"}
    run_async(_apply(traced, immediate))
    run_async(_apply(traced, delayed))
    run_async(_identify(traced))

    # --- an immediate campaign: one trace id from Track to the SMTP request
    traceparent, trace_id, client_span_id = _traceparent()
    shipped = ingest_pb2.Event(
        event_id="order-1",
        user_id="grace",
        name="order_shipped",
        properties=dict_to_struct({"order_id": "A-1", "total": 42, "eta": "Monday"}),
    )
    run_async(_track(traced, traceparent, shipped))

    def immediate_chain_complete(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return _has("nudge-dispatch", "CLIENT", "smtp send")(mine)

    receiver.wait_for(immediate_chain_complete, timeout_s=30)
    track = _one(
        receiver, trace_id, "nudge-ingest", "SERVER", "/nudge.ingest.v1.IngestService/Track"
    )
    assert track.parent_span_id == client_span_id
    append = _one(receiver, trace_id, "nudge-ingest", "INTERNAL", "append events")
    assert append.parent_span_id == track.span_id
    spans = receiver.trace(trace_id)  # after `_one` waited for ingest's export
    assert any(
        s.service == "nudge-ingest" and s.kind == "CLIENT" and s.parent_span_id == append.span_id
        for s in spans
    ), "the event-store INSERT is a child of the append"
    evaluate = _one(receiver, trace_id, "nudge-rules", "INTERNAL", "evaluate campaigns")
    assert evaluate.parent_span_id == track.span_id
    send_name = f"send {prefix}.dispatch.{workspace}.email"
    process_name = f"process {prefix}.dispatch.{workspace}.email"
    produce = _one(receiver, trace_id, "nudge-rules", "PRODUCER", send_name)
    assert produce.parent_span_id == evaluate.span_id
    assert produce.attributes["messaging.system"] == "nats"
    consume = _one(receiver, trace_id, "nudge-dispatch", "CONSUMER", process_name)
    assert consume.parent_span_id == produce.span_id
    assert consume.linked_to(produce)
    assert consume.attributes["messaging.consumer.group.name"] == "dispatch"
    smtp = _one(receiver, trace_id, "nudge-dispatch", "CLIENT", "smtp send")

    # The provider request descends from the consumed send request (through dispatch's own
    # spans), so the chain Track → evaluation → publish → consume → SMTP is one tree.
    def leads_to_consumer(all_spans: list[ReceivedSpan]) -> bool:
        by_id = {s.span_id: s for s in all_spans if s.trace_id == trace_id}
        ancestor = smtp
        while ancestor.span_id != consume.span_id:
            if ancestor.parent_span_id not in by_id:
                return False
            ancestor = by_id[ancestor.parent_span_id]
        return True

    receiver.wait_for(leads_to_consumer, timeout_s=10)

    # The relay's publish and the rules projection batch link to the Track call's span, and
    # the rules wake-up consumer links to the relay's publish. (Rules reads the store, not
    # NATS, so these may be exported after the send.)
    def relayed(all_spans: list[ReceivedSpan]) -> bool:
        return any(s.kind == "PRODUCER" and s.linked_to(track) for s in all_spans)

    everything = receiver.wait_for(relayed)
    relay = [
        s
        for s in everything
        if s.service == "nudge-ingest" and s.kind == "PRODUCER" and s.linked_to(track)
    ]
    assert [s.name for s in relay] == [f"send {prefix}.events.{workspace}"]
    assert relay[0].attributes["messaging.destination.name"] == f"{prefix}.events.{workspace}"
    receiver.wait_for(
        lambda all_spans: any(
            s.service == "nudge-rules" and s.kind == "CONSUMER" and s.linked_to(relay[0])
            for s in all_spans
        )
    )
    projection = [s for s in everything if s.name == "project events" and s.linked_to(track)]
    assert len(projection) == 1
    assert evaluate.linked_to(projection[0])

    # --- a delayed campaign: the firing starts a new trace that links to the arming one
    traceparent, arming_trace, _ = _traceparent()
    delivered = ingest_pb2.Event(
        event_id="order-1-delivered",
        user_id="grace",
        name="order_delivered",
        properties=dict_to_struct({"order_id": "A-1", "total": 42, "eta": "today"}),
    )
    run_async(_track(traced, traceparent, delivered))
    receiver.wait_for(
        lambda all_spans: any(
            s.service == "nudge-scheduler"
            and s.name == "/nudge.scheduler.v1.SchedulerService/Schedule"
            and s.trace_id == arming_trace
            for s in all_spans
        ),
        timeout_s=20,
    )
    armed = _one(
        receiver,
        arming_trace,
        "nudge-scheduler",
        "SERVER",
        "/nudge.scheduler.v1.SchedulerService/Schedule",
    )

    def fired_chain_complete(all_spans: list[ReceivedSpan]) -> bool:
        fires = [s for s in all_spans if s.service == "nudge-scheduler" and s.linked_to(armed)]
        if not fires:
            return False
        return _has("nudge-dispatch", "CLIENT", "smtp send")(
            [s for s in all_spans if s.trace_id == fires[0].trace_id]
        )

    receiver.wait_for(fired_chain_complete, timeout_s=30)
    [fire] = [s for s in receiver.spans if s.service == "nudge-scheduler" and s.linked_to(armed)]
    assert fire.kind == "PRODUCER"
    assert fire.name == f"send {prefix}.timers.rules"
    assert fire.trace_id != arming_trace
    assert fire.parent_span_id == ""  # a new trace, not a days-long one
    handled = _one(
        receiver, fire.trace_id, "nudge-rules", "CONSUMER", f"process {prefix}.timers.rules"
    )
    assert handled.parent_span_id == fire.span_id
    assert handled.linked_to(fire)
    _one(receiver, fire.trace_id, "nudge-rules", "PRODUCER", send_name)
    _one(receiver, fire.trace_id, "nudge-dispatch", "CONSUMER", process_name)
    _one(receiver, fire.trace_id, "nudge-dispatch", "CLIENT", "smtp send")
    assert len(traced.smtp.wait_for(2, 10)) == 2

    # No PII in any span: no address, no name, no rendered text.
    for span in receiver.spans:
        text = repr(span.attributes) + span.name
        for secret in (EMAIL, FIRST_NAME, "Monday", "on its way"):
            assert secret not in text, (span.service, span.name)


def test_a_retried_send_continues_the_trace_of_its_request(
    traced: TracedStack, database_url: str
) -> None:
    receiver = traced.receiver
    run_async(_apply(traced, yaml.safe_load((EXAMPLES / "order-shipped.yaml").read_text())))
    run_async(_identify(traced))
    traced.smtp.faults.append(SmtpFault("mail", "421 4.3.2 Try again later"))
    traceparent, trace_id, _ = _traceparent()
    shipped = ingest_pb2.Event(
        event_id="order-2",
        user_id="grace",
        name="order_shipped",
        properties=dict_to_struct({"order_id": "A-2", "total": 42, "eta": "Friday"}),
    )
    run_async(_track(traced, traceparent, shipped))

    def smtp_sends(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [
            s
            for s in spans
            if s.trace_id == trace_id and s.kind == "CLIENT" and s.name == "smtp send"
        ]

    receiver.wait_for(lambda spans: len(smtp_sends(spans)) == 1, timeout_s=20)
    run_async(_advance(database_url, timedelta(hours=1)))  # past the retry's due time
    spans = receiver.wait_for(lambda spans: len(smtp_sends(spans)) == 2, timeout_s=30)
    retry = _one(receiver, trace_id, "nudge-dispatch", "INTERNAL", "attempt send")
    [failed] = [s for s in smtp_sends(spans) if s.parent_span_id != retry.span_id]
    [delivered] = [s for s in smtp_sends(spans) if s.parent_span_id == retry.span_id]
    assert failed.status_code == 2  # ERROR: the 421
    assert delivered.status_code != 2  # the sweeper's retry, in the request's trace
    assert len(traced.smtp.wait_for(1, 10)) == 1


async def _advance(database_url: str, step: timedelta) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE dev_clock SET skew = skew + $1::interval", step)
        await conn.execute("NOTIFY nudge_clock")
    finally:
        await conn.close()
