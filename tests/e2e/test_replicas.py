"""Two replicas each of rules, scheduler and dispatch against one database and one NATS process a
load without sending anything twice, and their metrics add up to what happened."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
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
from nudge.testing.services import ServiceProcesses
from nudge.testing.sinks import SmtpSink
from tests.e2e.conftest import _make_key

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "campaigns"
REPLICATED = ("rules", "scheduler", "dispatch")
ORDERS = 100
DELAYED = 30
# One order per user: this test is about replicas, not campaign re-eligibility (several orders
# of one user tracked concurrently can get "not_reeligible" when received_at runs backwards in
# commit order; reported separately).
USERS = ORDERS


@dataclass
class Replicas:
    first: ServiceProcesses
    second: ServiceProcesses
    api_key: str
    database_url: str

    def metrics_addresses(self, service: str) -> list[str]:
        sets = [self.first] + ([self.second] if service in REPLICATED else [])
        return [s.metrics_addresses[service] for s in sets]


@pytest.fixture
def replicas(
    database_url: str, nats_url: str, test_id: str, tmp_path: Path, smtp_sink: SmtpSink
) -> Iterator[Replicas]:
    api_key = run_async(_make_key(database_url, f"ws-{test_id}"))

    def configure(index: int) -> ServiceProcesses:
        return ServiceProcesses.configure(
            database_url=database_url,
            nats_url=nats_url,
            nats_prefix=f"t{test_id}",
            log_dir=tmp_path / f"logs-{index}",
            extra_env={"NUDGE_SMTP_URL": smtp_sink.url},
        )

    sets = [configure(1)]
    try:
        sets[0].start_all()
        sets.append(configure(2))  # after the first set listens: no port is handed out twice
        for name in REPLICATED:  # the second set's rules uses the second scheduler
            sets[1].start(name)
        sets[1].wait_serving(list(REPLICATED))
        yield Replicas(sets[0], sets[1], api_key, database_url)
    finally:
        for processes in sets:
            processes.stop_all()


async def _drive(replicas: Replicas) -> None:
    auth = (("authorization", f"Bearer {replicas.api_key}"),)
    immediate = yaml.safe_load((EXAMPLES / "order-shipped.yaml").read_text())
    followup = immediate | {
        "id": "order-followup",
        "delay": "1s",
        "trigger": {"event": "order_delivered"},
        "message": immediate["message"] | {"subject": "Follow-up {{ event.properties.order_id }}"},
    }
    async with grpc.aio.insecure_channel(replicas.second.addresses["rules"]) as channel:
        rules = rules_pb2_grpc.RulesServiceStub(channel)
        for definition in (immediate, followup):
            await rules.ApplyCampaign(
                rules_pb2.ApplyCampaignRequest(definition=dict_to_struct(definition)),
                metadata=auth,
                timeout=10,
            )
    async with grpc.aio.insecure_channel(replicas.first.addresses["ingest"]) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        for user in range(USERS):
            await ingest.Identify(
                ingest_pb2.IdentifyRequest(
                    user_id=f"u{user}", traits=dict_to_struct({"email": f"u{user}@example.test"})
                ),
                metadata=auth,
                timeout=10,
            )

        def event(name: str, number: int) -> ingest_pb2.Event:
            order_id = f"order-{number}"
            return ingest_pb2.Event(
                event_id=f"{name}-{order_id}",
                user_id=f"u{number % USERS}",
                name=name,
                properties=dict_to_struct({"order_id": order_id, "total": 30, "eta": "soon"}),
            )

        events = [event("order_shipped", n) for n in range(ORDERS)]
        events += [event("order_delivered", n) for n in range(DELAYED)]
        batches = [events[i : i + 5] for i in range(0, len(events), 5)]
        responses = await asyncio.gather(
            *(
                ingest.Track(ingest_pb2.TrackRequest(events=b), metadata=auth, timeout=10)
                for b in batches
            )
        )
    statuses = {r.status for response in responses for r in response.results}
    assert statuses == {ingest_pb2.EVENT_STATUS_ACCEPTED}


async def _trail(database_url: str, subjects: list[str]) -> str:
    """Where the orders of missing mails got to: event, decisions, send (for the report)."""
    # "Your order order-7 is on its way", "Follow-up order-7"
    orders = [s.split()[2] if s.startswith("Your") else s.split()[1] for s in subjects]
    conn = await asyncpg.connect(database_url)
    try:
        lines = [f"missing: {orders}"]
        for order in orders:
            events = await conn.fetch(
                "SELECT event_id, tx_id::text, global_position, received_at FROM events"
                " WHERE properties->>'order_id' = $1",
                order,
            )
            decisions = await conn.fetch(
                "SELECT campaign_id, kind, reason FROM decisions WHERE event_id = ANY($1::text[])",
                [e["event_id"] for e in events],
            )
            sends = await conn.fetch(
                "SELECT send_id, state, reason FROM sends"
                " WHERE position(convert_to($1, 'UTF8') IN request) > 0",
                order,
            )
            lines.append(f"{order}: {[dict(r) for r in events]} {[dict(r) for r in decisions]}")
            lines.append(f"  sends: {[dict(r) for r in sends]}")
        checkpoints = await conn.fetch("SELECT * FROM reader_checkpoints")
        lines.append(f"checkpoints: {[dict(r) for r in checkpoints]}")
        return "\n".join(lines)
    finally:
        await conn.close()


def _scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            samples[match[1]] = float(match[2])
    return samples


def _total(replicas: Replicas, service: str, sample: str) -> float:
    return sum(_scrape(a).get(sample, 0.0) for a in replicas.metrics_addresses(service))


def test_two_replicas_of_each_worker_send_every_message_exactly_once(
    replicas: Replicas, smtp_sink: SmtpSink
) -> None:
    run_async(_drive(replicas))
    smtp_sink.wait_for(ORDERS + DELAYED, timeout_s=60)
    run_async(asyncio.sleep(1.5))  # time for a duplicate to show up, if there were one
    arrivals = Counter(mail.subject for mail in smtp_sink.messages)
    expected: dict[str, Any] = {f"Your order order-{n} is on its way": 1 for n in range(ORDERS)}
    expected |= {f"Follow-up order-{n}": 1 for n in range(DELAYED)}
    missing = [subject for subject in expected if subject not in arrivals]
    assert dict(arrivals) == expected, run_async(_trail(replicas.database_url, missing))

    # Every replica serves metrics, and the counters of the replicas add up to the load.
    accepted = _total(replicas, "ingest", 'nudge_ingest_events_total{outcome="accepted"}')
    assert accepted == USERS + ORDERS + DELAYED
    assert _total(replicas, "ingest", "nudge_store_append_batch_events_count") >= 1
    assert _total(replicas, "rules", "nudge_rules_projected_events_total") >= accepted
    assert _total(replicas, "scheduler", "nudge_timers_fired_total") == DELAYED
    assert _total(replicas, "scheduler", "nudge_timer_lateness_seconds_count") == DELAYED
    sent = 'nudge_dispatch_provider_requests_total{channel="email",result="ok"}'
    assert _total(replicas, "dispatch", sent) == ORDERS + DELAYED
    track = (
        'nudge_grpc_server_handled_total{code="OK",method="/nudge.ingest.v1.IngestService/Track"}'
    )
    assert _total(replicas, "ingest", track) == (ORDERS + DELAYED) / 5
